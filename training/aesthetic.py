"""The LAION aesthetic predictor the official data set is filtered with (score > 5.1 for the released teacher).

CLIP ViT-L/14 (openai/clip-vit-large-patch14, the `model.safetensors` of its Hugging Face repo: only the vision
tower and `visual_projection` are read) gives the image embedding, L2-normalised; the improved-aesthetic-predictor
MLP head (`sac+logos+ava1-l14-linearMSE.pth`, key names `layers.{0,2,4,6,7}.*`) maps it to a score (about 1-10).
Preprocessing as openai's `clip.load`: shorter side to 224 (bicubic), centre crop, CLIP mean/std.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from apple_video import weights
from apple_video.errors import WeightsError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EMBED_DIM = 768
VISION_PREFIXES = ("vision_model.", "visual_projection.")


class AestheticHead(nn.Module):
    """improved-aesthetic-predictor's MLP (linear layers, dropouts between them, no activations)."""

    def __init__(self, input_size: int = EMBED_DIM) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


def clip_l14_config():
    """openai/clip-vit-large-patch14's vision tower."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=224, patch_size=14, projection_dim=EMBED_DIM, hidden_act="quick_gelu")


def clip_preprocess(rgb: np.ndarray, size: int) -> torch.Tensor:
    image = Image.fromarray(rgb)
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    array = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255.0
    return torch.from_numpy((array - CLIP_MEAN) / CLIP_STD).permute(2, 0, 1).float()


class AestheticScorer:
    """RGB images -> LAION aesthetic scores."""

    def __init__(self, clip: nn.Module, head: AestheticHead, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.clip = clip.eval().to(self.device)
        self.head = head.eval().to(self.device)
        self.size = int(clip.config.image_size)

    @classmethod
    def from_files(cls, clip_path: Path, head_path: Path, device: torch.device | str = "cpu") -> AestheticScorer:
        """From the files `aesthetic-clip-l14` and `aesthetic-mlp` (as prepare-data's planner resolved them)."""
        return cls(load_clip_vision(clip_path, clip_l14_config()), load_head(head_path), device)

    @torch.no_grad()
    def score(self, images: list[np.ndarray]) -> np.ndarray:
        pixels = torch.stack([clip_preprocess(image, self.size) for image in images]).to(self.device)
        embedding = self.clip(pixel_values=pixels).image_embeds
        embedding = embedding / embedding.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.head(embedding.float())[:, 0].cpu().numpy()


def load_clip_vision(path: Path, config) -> nn.Module:
    """The vision tower + projection of a CLIPModel safetensors file (text weights are not read)."""
    from safetensors import safe_open
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection(config)
    # reads the vision weights only; truncated files, foreign formats, wrong shapes all end in one WeightsError
    with weights.refused_as(f"{path} is not openai/clip-vit-large-patch14's model.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            state = {k: handle.get_tensor(k) for k in handle.keys() if k.startswith(VISION_PREFIXES)}
        model.load_state_dict(state, strict=False)
        missing = set(model.state_dict()) - set(state)
    if missing - {"vision_model.embeddings.position_ids"}:
        raise WeightsError(f"{path} is not a CLIP model file ({len(missing)} vision weights missing)")
    return model


def load_head(path: Path) -> AestheticHead:
    head = AestheticHead()
    refused = f"{path} is not the improved-aesthetic-predictor MLP"
    state = weights.load_checkpoint(path, refused)
    with weights.refused_as(refused):
        head.load_state_dict(state, strict=True)
    return head

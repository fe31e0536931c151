"""Identity features for PuLID's IDFormer: an ArcFace-style embedding plus EVA-CLIP CLS and 5 hidden states.

Real: insightface antelopev2 ArcFace (glintr100, 512-d) + EVA02-CLIP-L-14-336 (timm `Eva`, 768-d CLS,
hidden states entering blocks 4, 8, 12, 16, 20), the face shown grey on a white background as PuLID does.
Tiny: dlib's 128-d embedding + a tiny random `Eva` of the same class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
import torch
from timm.models.eva import Eva

from apple_video.faces.mask import hull_mask, oval_mask
from apple_video.faces.types import SourceFace

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class IdentityFeatures:
    id_cond: torch.Tensor  # (1, id_dim)
    vit_hidden: list[torch.Tensor]  # 5 x (1, n_tokens, vit_dim)


class IdentityFeatureExtractor(Protocol):
    def __call__(self, source: SourceFace) -> IdentityFeatures: ...


def eva_features(model: Eva, pixels: torch.Tensor, stride: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """CLS embedding (after norm and head) and the hidden states entering blocks stride, 2*stride, ... 5*stride."""
    x = model.patch_embed(pixels)
    x, rope = model._pos_embed(x)
    x = model.norm_pre(x)
    hidden = []
    for index, block in enumerate(model.blocks):
        if 0 < index <= 5 * stride and index % stride == 0:
            hidden.append(x)
        x = block(x, rope=rope)
    cls = model.head(model.fc_norm(model.norm(x)[:, 0]) if hasattr(model, "fc_norm") else model.norm(x)[:, 0])
    return cls, hidden


def face_on_white(crop: np.ndarray, landmarks: np.ndarray | None) -> np.ndarray:
    """PuLID's EVA input: the face region in greyscale, everything else white."""
    size = crop.shape[0]
    mask = hull_mask(landmarks, size) if landmarks is not None else oval_mask(size)
    gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    out = np.full_like(crop, 255)
    out[mask > 0] = np.repeat(gray[..., None], 3, axis=2)[mask > 0]
    return out


def _to_eva_input(image: np.ndarray, size: int) -> torch.Tensor:
    resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0
    tensor = torch.from_numpy(resized).permute(2, 0, 1)[None]
    mean = torch.tensor(OPENAI_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_STD)[:, None, None]
    return (tensor - mean) / std


class TinyIdentity:
    """dlib 128-d embedding (real, offline) + a tiny random EVA: the real code path at test scale."""

    def __init__(self, seed: int, embed_dim: int = 32, image_size: int = 56) -> None:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed + 1)
        self.eva = Eva(img_size=image_size, patch_size=14, embed_dim=embed_dim, depth=6, num_heads=2, num_classes=embed_dim,
                       global_pool="token").eval()
        torch.random.set_rng_state(generator_state)
        self.image_size = image_size
        self.id_dim = 128 + embed_dim
        self.vit_dim = embed_dim

    @torch.no_grad()
    def __call__(self, source: SourceFace) -> IdentityFeatures:
        arc = torch.as_tensor(source.face.embedding if source.face.embedding is not None else np.zeros(128),
                              dtype=torch.float32)[None]
        pixels = _to_eva_input(face_on_white(source.crop, source.landmarks), self.image_size)
        cls, hidden = eva_features(self.eva, pixels, stride=1)
        cls = torch.nn.functional.normalize(cls, dim=-1)
        return IdentityFeatures(torch.cat([arc, cls], dim=-1), hidden)

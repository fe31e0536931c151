"""PuLID's identity features from the real checkpoints: insightface antelopev2 ArcFace + EVA02-CLIP-L-14-336."""

from __future__ import annotations

import numpy as np
import torch

from apple_video import weights
from apple_video.errors import WeightsError
from apple_video.faces.parsing import FaceParser
from apple_video.faces.types import SourceFace
from apple_video.models.identity import IdentityFeatures, announce_parser, eva_features, eva_input
from apple_video.weights import ModelFiles

EVA_ARCH = "eva02_large_patch14_clip_336"


def eva_dims(state: dict[str, torch.Tensor]) -> dict:
    """timm `Eva` arguments read off an EVA-CLIP vision state (prefix stripped): the EVA02-L-14-336 checkpoint gives
    timm's eva02_large_patch14_clip_336 exactly (336 px, 1024 wide, 24 blocks, 16 heads of 64, head to 768)."""
    width, _, patch, _ = state["patch_embed.proj.weight"].shape
    grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
    hidden = state["blocks.0.mlp.w1.weight"].shape[0]
    return dict(img_size=grid * patch, patch_size=patch, embed_dim=width, num_heads=max(1, width // 64),
                depth=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
                mlp_ratio=(hidden + 0.5) / width, num_classes=state["head.weight"].shape[0])


def load_eva_clip(path, device: torch.device) -> torch.nn.Module:
    """timm's Eva with the EVA-CLIP checkpoint (`visual.*` keys mapped by timm's own filter)."""
    import timm
    from timm.models.eva import checkpoint_filter_fn

    state = weights.load_checkpoint(path, f"EVA-CLIP file unreadable: {path}")
    state = {k: v for k, v in state.items() if k.startswith("visual.")} or state
    try:
        dims = eva_dims({k.removeprefix("visual."): v for k, v in state.items()})
    except (KeyError, IndexError, ValueError):
        raise WeightsError(f"EVA-CLIP file {path} is not an EVA-CLIP vision checkpoint") from None
    model = timm.create_model(EVA_ARCH, pretrained=False, **dims)
    missing, _ = model.load_state_dict(checkpoint_filter_fn(state, model), strict=False)
    if missing:
        raise WeightsError(f"EVA-CLIP file {path} does not fit {EVA_ARCH} ({len(missing)} missing keys)")
    return model.eval().to(device)


class PulidIdentity:
    """ArcFace (glintr100, 512-d) on the 112 crop + EVA-CLIP CLS (768-d) and hidden states of the grey face."""

    def __init__(self, device: torch.device, files: ModelFiles, parser: FaceParser | None = None) -> None:
        """`files`: the planner's resolved model files (antelopev2-arcface and eva02-clip-l-336 among them)."""
        from insightface.model_zoo import get_model

        self.device = device
        self.parser = parser
        announce_parser(parser)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
        self.arcface = get_model(str(files("antelopev2-arcface")), providers=providers)
        self.arcface.prepare(ctx_id=0 if device.type == "cuda" else -1)
        self.eva = load_eva_clip(files("eva02-clip-l-336"), device)

    @torch.no_grad()
    def __call__(self, source: SourceFace) -> IdentityFeatures:
        from insightface.utils.face_align import norm_crop

        bgr = np.ascontiguousarray(source.image[..., ::-1])
        arc = torch.as_tensor(self.arcface.get_feat(norm_crop(bgr, source.face.kps)).ravel(), dtype=torch.float32)[None]
        pixels = eva_input(source, self.parser, self.eva.patch_embed.img_size[0]).to(self.device)
        # PuLID takes the states entering blocks 4, 8, 12, 16, 20 of EVA02-L's 24
        cls, hidden = eva_features(self.eva, pixels, stride=max(1, len(self.eva.blocks) // 6))
        cls = torch.nn.functional.normalize(cls.float(), dim=-1).cpu()
        return IdentityFeatures(torch.cat([arc, cls], dim=-1), [h.float().cpu() for h in hidden])

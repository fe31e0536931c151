"""PuLID's identity features from the real checkpoints: insightface antelopev2 ArcFace + EVA02-CLIP-L-14-336."""

from __future__ import annotations

import numpy as np
import torch

from apple_video import weights
from apple_video.errors import WeightsError
from apple_video.faces.parsing import FaceParser
from apple_video.faces.types import SourceFace
from apple_video.models.identity import IdentityFeatures, announce_parser, eva_features, eva_input

EVA_ARCH = "eva02_large_patch14_clip_336"


def load_eva_clip(path, device: torch.device) -> torch.nn.Module:
    """timm's Eva with the EVA-CLIP checkpoint (`visual.*` keys mapped by timm's own filter)."""
    import timm
    from timm.models.eva import checkpoint_filter_fn

    model = timm.create_model(EVA_ARCH, pretrained=False)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise WeightsError(f"EVA-CLIP file unreadable: {path} ({error.__class__.__name__})") from None
    state = {k: v for k, v in state.items() if k.startswith("visual.")} or state
    missing, _ = model.load_state_dict(checkpoint_filter_fn(state, model), strict=False)
    if missing:
        raise WeightsError(f"EVA-CLIP file {path} does not fit {EVA_ARCH} ({len(missing)} missing keys)")
    return model.eval().to(device)


class PulidIdentity:
    """ArcFace (glintr100, 512-d) on the 112 crop + EVA-CLIP CLS (768-d) and hidden states of the grey face."""

    def __init__(self, device: torch.device, parser: FaceParser | None = None) -> None:
        from insightface.model_zoo import get_model

        self.device = device
        self.parser = parser
        announce_parser(parser)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
        self.arcface = get_model(str(weights.require("antelopev2-arcface")), providers=providers)
        self.arcface.prepare(ctx_id=0 if device.type == "cuda" else -1)
        self.eva = load_eva_clip(weights.require("eva02-clip-l-336"), device)

    @torch.no_grad()
    def __call__(self, source: SourceFace) -> IdentityFeatures:
        from insightface.utils.face_align import norm_crop

        bgr = np.ascontiguousarray(source.image[..., ::-1])
        arc = torch.as_tensor(self.arcface.get_feat(norm_crop(bgr, source.face.kps)).ravel(), dtype=torch.float32)[None]
        pixels = eva_input(source, self.parser, 336).to(self.device)
        cls, hidden = eva_features(self.eva, pixels, stride=4)
        cls = torch.nn.functional.normalize(cls.float(), dim=-1).cpu()
        return IdentityFeatures(torch.cat([arc, cls], dim=-1), [h.float().cpu() for h in hidden])

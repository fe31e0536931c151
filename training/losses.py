"""The perceptual (LPIPS, VGG) term of the official trainer, with its backbone from the weights catalogue."""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import torch

from apple_video import weights
from apple_video.errors import WeightsError
from apple_video.weights import ModelFiles

logger = logging.getLogger(__name__)

LpipsBackbone = Literal["vgg16", "random"]
# lpips' vgg16 keeps torchvision's layer numbers inside its five slices: `sliceK.<i>.*` is `features.<i>.*`.
VGG_SLICES = ((1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)), (5, range(23, 30)))


def vgg_features_to_lpips(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision VGG16 `features.<i>.weight` keys -> lpips' `slice<k>.<i>.weight`."""
    out = {}
    for key, value in state.items():
        if not key.startswith("features."):
            continue
        index = int(key.split(".")[1])
        for k, layers in VGG_SLICES:
            if index in layers:
                out[f"slice{k}.{key.removeprefix('features.')}"] = value
    return out


VGG_WEIGHTS = "vgg16-lpips"


def lpips_files(backbone: LpipsBackbone) -> ModelFiles:
    """For a planner: the VGG16 backbone's file `vgg16-lpips` (a WeightsError when it is missing); none for "random"."""
    return ModelFiles.resolve([VGG_WEIGHTS]) if backbone == "vgg16" else ModelFiles()


def load_lpips(backbone: LpipsBackbone, device: torch.device, files: ModelFiles = ModelFiles()) -> torch.nn.Module:
    """LPIPS(vgg) with its linear heads from the lpips package and the VGG16 backbone from `vgg16-lpips` in the
    planner's `files` (see `lpips_files`; "random": a random backbone, for tests). Frozen, in eval mode; inputs in
    [-1, 1]."""
    import lpips

    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if backbone == "vgg16":
        path = files(VGG_WEIGHTS)
        state = weights.load_checkpoint(path, f"VGG16 file unreadable: {path}")
        mapped = vgg_features_to_lpips(state)
        missing, _ = model.net.load_state_dict(mapped, strict=False)
        if missing or not mapped:
            raise WeightsError(f"{path} is not torchvision's VGG16 ({len(missing)} backbone weights missing)")
    else:
        logger.warning("LPIPS with a random VGG backbone: only for tests and toy runs")
    return model.to(device).eval().requires_grad_(False)

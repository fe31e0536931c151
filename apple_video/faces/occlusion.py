"""Face occlusion masks: the DeepLabV3+ network of the official APPLE preprocessing (mmsegmentation's EncoderDecoder
with a ResNetV1c-101 backbone and a DepthwiseSeparableASPPHead, 2 classes: 1 = face visible), written in plain
torch with mmseg's module names so that `checkpoints/deeplabv3_iter_27600.pth` loads as is (the network:
`faces/occlusion_net.py`, imported only when occlusion masks are asked for).

What covers a target face (a hand, a microphone, a glasses frame) is class 0: the paste keeps the target there."""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from apple_video import weights
from apple_video.errors import WeightsError
from apple_video.weights import ModelFiles

if TYPE_CHECKING:  # torch loads only when occlusion masks are asked for
    pass

logger = logging.getLogger(__name__)

OCCLUSION_WEIGHTS = "occlusion-deeplabv3"
OCCLUSION_SIZE = 512  # the official test pipeline's scale
MEAN = (123.675, 116.28, 103.53)  # mmseg's img_norm_cfg (RGB)
STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class OcclusionConfig:
    """The network's shape. Defaults: the official file (ResNetV1c-101, ASPP at 512 channels)."""

    blocks: tuple[int, int, int, int] = (3, 4, 23, 3)
    stem_channels: int = 64
    base_channels: int = 64
    channels: int = 512
    c1_channels: int = 48
    dilations: tuple[int, ...] = (1, 12, 24, 36)
    num_classes: int = 2


def build_occlusion_net(config: OcclusionConfig = OcclusionConfig(), seed: int | None = None):
    """The network with random weights (seeded when `seed` is given), in eval mode."""
    import torch

    from apple_video.faces.occlusion_net import OcclusionNet

    state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        return OcclusionNet(config).eval()
    finally:
        torch.random.set_rng_state(state)


def config_from_state(state: dict) -> OcclusionConfig:
    """The shape of the network a state dict was saved from (the official file or a smaller stand-in)."""
    b1, b2, b3, b4 = (len({k.split(".")[2] for k in state if k.startswith(f"backbone.layer{i}.")}) for i in range(1, 5))
    # the atrous rates leave no trace in the weights: the official ones, as many as there are ASPP branches
    count = len({k.split(".")[2] for k in state if k.startswith("decode_head.aspp_modules.")})
    dilations = OcclusionConfig().dilations[:count]
    return OcclusionConfig(
        blocks=(b1, b2, b3, b4),
        stem_channels=int(state["backbone.stem.6.weight"].shape[0]),
        base_channels=int(state["backbone.layer1.0.conv1.weight"].shape[0]),
        channels=int(state["decode_head.conv_seg.weight"].shape[1]),
        c1_channels=int(state["decode_head.c1_bottleneck.conv.weight"].shape[0]),
        dilations=tuple(dilations),
        num_classes=int(state["decode_head.conv_seg.weight"].shape[0]),
    )


def _read_checkpoint(path) -> dict:
    """The state dict of an mmseg checkpoint ({'meta', 'state_dict', 'optimizer'}) or of a bare state dict. Tensors
    only (weights_only); should a file's meta hold other objects, it is unpickled in full only when its sha256 is
    the catalogue's."""
    unreadable = {"unreadable": f"{path} is not a readable checkpoint", "hint": "; delete it and download again",
                  "errors": (RuntimeError, OSError, EOFError)}
    try:
        checkpoint = weights.load_checkpoint(path, **unreadable)
    except pickle.UnpicklingError:
        if weights.check_file(weights.lookup(OCCLUSION_WEIGHTS), path, verify_hash=True) != "present":
            raise WeightsError(f"{path} holds more than tensors and is not the catalogued "
                               "deeplabv3_iter_27600.pth (sha256 differs)") from None
        checkpoint = weights.load_checkpoint(path, **unreadable, weights_only=False)
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{path} is not an mmsegmentation checkpoint")
    state = checkpoint.get("state_dict", checkpoint)
    return {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("auxiliary_head.")}


def load_occlusion_net(path: Path | str, device: str = "cpu"):
    """The occlusion network from its file (the catalogue's, as the planner resolved it), its shape read from it."""
    path = Path(path)
    state = _read_checkpoint(path)
    with weights.refused_as(f"{path} is not the APPLE DeepLabV3+ occlusion checkpoint",
                            errors=(KeyError, RuntimeError, ValueError)):
        model = build_occlusion_net(config_from_state(state))
        model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def occlusion_mask(model, rgb: np.ndarray) -> np.ndarray:
    """float32 (H, W) mask of an RGB uint8 face crop: 1 where the face is visible, 0 where something covers it
    (and off the face). The crop is resized to 512 as the official test pipeline does."""
    import torch

    h, w = rgb.shape[:2]
    image = cv2.resize(np.ascontiguousarray(rgb[..., :3]), (OCCLUSION_SIZE, OCCLUSION_SIZE),
                       interpolation=cv2.INTER_AREA if max(h, w) > OCCLUSION_SIZE else cv2.INTER_LINEAR)
    normalised = (image.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
    device = next(model.parameters()).device
    tensor = torch.from_numpy(normalised).permute(2, 0, 1)[None].to(device)
    with torch.no_grad():
        logits = model(tensor)[0].float()
    visible = (logits[1] > logits[0]).cpu().numpy().astype(np.float32)
    return cv2.resize(visible, (w, h), interpolation=cv2.INTER_LINEAR).round().astype(np.float32)


class OcclusionMasker:
    """The network and where it runs, for one job; masks per crop."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        return occlusion_mask(self.model, crop)


def occlusion_files(wanted: bool) -> ModelFiles:
    """For a planner: the occlusion net's file when occlusion masks are `wanted` and it is present (they are
    optional: without it the masks are off)."""
    return ModelFiles.present([OCCLUSION_WEIGHTS]) if wanted else ModelFiles()


def create_occlusion(wanted: bool, files: ModelFiles, device: str = "auto") -> OcclusionMasker | None:
    """The occlusion masker when `wanted` and `files` has its file; else None, with one line saying it is off.
    `device` auto: CUDA when there is one."""
    if not wanted:
        return None
    if OCCLUSION_WEIGHTS not in files:
        logger.info("occlusion masks off: %s not found (%s); see `apple-video weights where`", OCCLUSION_WEIGHTS,
                    weights.lookup(OCCLUSION_WEIGHTS).relpath)
        return None
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return OcclusionMasker(load_occlusion_net(files(OCCLUSION_WEIGHTS), device=device))

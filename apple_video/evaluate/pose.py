"""Head pose for the evaluation: the paper's network (HopeNet, Ruiz et al. 2018) where its weights are present,
else the landmark fit of `landmarks.fit_pose`. Every report names which one ran.

HopeNet as published (natanielruiz/deep-head-pose, `hopenet_robust_alpha1.pkl`): a torchvision ResNet-50 trunk
without its `fc`, three 66-bin heads `fc_yaw`, `fc_pitch`, `fc_roll` (3-degree bins from -99 degrees) and a
vestigial `fc_finetune` (2051 -> 3) kept in the checkpoint. The angle is the softmax expectation over the bins.
Its input is the face box widened (half a width each side, 3/4 of a height above, 1/4 below), its shorter side
resized to 224 and the centre 224 x 224 kept, normalised with ImageNet statistics.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from apple_video.errors import UserError, WeightsError
from apple_video.evaluate.landmarks import POSE_MODEL, PoseFit, fit_pose
from apple_video.faces.types import Face
from apple_video.weights import ModelFiles

logger = logging.getLogger(__name__)

PoseModelName = Literal["auto", "hopenet", "landmarks"]
POSE_MODEL_CHOICES: tuple[str, ...] = ("auto", "hopenet", "landmarks")
HOPENET_WEIGHTS = "hopenet-robust-alpha1"
HOPENET_MODEL = "HopeNet ResNet-50, 66 bins (hopenet_robust_alpha1, 300W-LP), as the paper"
BINS = 66
BIN_DEGREES = 3.0
FIRST_BIN = -99.0
INPUT_SIZE = 224
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class HopeNet(ResNet):
    """ResNet with three binned angle heads; `blocks` per stage (3, 4, 6, 3) and bottleneck `width` 64 is
    ResNet-50, the published one.

    forward: (N, 3, 224, 224) ImageNet-normalised RGB -> (N, 3) degrees (yaw, pitch, roll)."""

    def __init__(self, blocks: tuple[int, int, int, int] = (3, 4, 6, 3), bins: int = BINS, width: int = 64) -> None:
        super().__init__(Bottleneck, list(blocks), width_per_group=width)
        del self.fc
        width = 512 * Bottleneck.expansion
        self.fc_yaw = nn.Linear(width, bins)
        self.fc_pitch = nn.Linear(width, bins)
        self.fc_roll = nn.Linear(width, bins)
        self.fc_finetune = nn.Linear(width + 3, 3)  # unused, but in the published checkpoint
        self.register_buffer("bin_centres", FIRST_BIN + BIN_DEGREES * torch.arange(bins, dtype=torch.float32),
                             persistent=False)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc_yaw(x), self.fc_pitch(x), self.fc_roll(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = self.logits(x)
        return torch.stack([(h.softmax(1) * self.bin_centres).sum(1) for h in heads], 1)


def _blocks_in(state: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
    counts = [0, 0, 0, 0]
    for key in state:
        match = re.match(r"layer([1-4])\.(\d+)\.", key)
        if match:
            stage, block = int(match.group(1)) - 1, int(match.group(2))
            counts[stage] = max(counts[stage], block + 1)
    return tuple(counts)  # type: ignore[return-value]


def load_hopenet(path: Path, device: str = "cpu") -> HopeNet:
    """The catalogue's HopeNet checkpoint (a pickled state dict, as the planner resolved it), its depth read from
    its keys."""
    path = Path(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (torch raises many kinds for a file that is not a checkpoint)
        raise WeightsError(f"not a HopeNet checkpoint: {path} ({error.__class__.__name__})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "fc_yaw.weight" not in state:
        raise WeightsError(f"not a HopeNet checkpoint (no fc_yaw): {path}")
    net = HopeNet(_blocks_in(state), bins=state["fc_yaw.weight"].shape[0], width=state["layer1.0.conv1.weight"].shape[0])
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"HopeNet checkpoint {path} does not fit the published layout "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return net.eval().to(device)


def hopenet_crop(rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
    """HopeNet's input for a face box (x0, y0, x1, y1): the widened box clipped to the frame, shorter side to 224,
    centre 224 x 224, ImageNet-normalised: (3, 224, 224) float32."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    bw, bh = x1 - x0, y1 - y0
    left, right = max(0, int(x0 - bw / 2)), min(w, int(x1 + bw / 2))
    top, bottom = max(0, int(y0 - 3 * bh / 4)), min(h, int(y1 + bh / 4))
    if right - left < 2 or bottom - top < 2:
        raise ValueError(f"face box {box} is outside the {w}x{h} frame")
    region = rgb[top:bottom, left:right]
    scale = INPUT_SIZE / min(region.shape[:2])  # shorter side to 224, then the centre 224 x 224
    size = (max(INPUT_SIZE, round(region.shape[1] * scale)), max(INPUT_SIZE, round(region.shape[0] * scale)))
    resized = cv2.resize(region, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    y0, x0 = (size[1] - INPUT_SIZE) // 2, (size[0] - INPUT_SIZE) // 2
    crop = resized[y0:y0 + INPUT_SIZE, x0:x0 + INPUT_SIZE]
    return ((crop.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


@dataclass
class PoseTrack:
    """One face's pose along a clip: the previous frame's landmark fit seeds the next one."""

    previous: PoseFit | None = None


@dataclass
class PoseEstimator:
    """(yaw, pitch, roll) of a face in a frame, by HopeNet when `net` is set, else by the landmark fit."""

    net: HopeNet | None = None
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = HOPENET_MODEL if self.net is not None else POSE_MODEL

    @property
    def kind(self) -> str:
        return "hopenet" if self.net is not None else "landmarks"

    def angles(self, rgb: np.ndarray, face: Face, track: PoseTrack | None = None) -> np.ndarray:
        """Degrees; NaN where the landmark fit is bad (HopeNet always answers)."""
        if self.net is not None:
            batch = torch.from_numpy(hopenet_crop(rgb, np.asarray(face.bbox)))[None]
            with torch.inference_mode():
                return self.net(batch)[0].double().numpy()
        fit = fit_pose(face.landmarks, rgb.shape[:2], track.previous if track else None)
        if track is not None:
            track.previous = fit if fit.found else None
        return fit.angles


def pose_files(name: str) -> ModelFiles:
    """For a planner: HopeNet's file when asked for by name (a WeightsError when it is missing), or when `auto`
    finds it present."""
    if name not in POSE_MODEL_CHOICES:
        raise UserError(f"unknown pose model '{name}' (choices: {', '.join(POSE_MODEL_CHOICES)})")
    if name == "hopenet":
        return ModelFiles.resolve([HOPENET_WEIGHTS])
    return ModelFiles.present([HOPENET_WEIGHTS]) if name == "auto" else ModelFiles()


def create_pose_estimator(name: str, files: ModelFiles = ModelFiles()) -> PoseEstimator:
    """auto: HopeNet when `files` (the planner's, `pose_files`) has its weights, else the landmark fit; hopenet:
    HopeNet."""
    if name not in POSE_MODEL_CHOICES:
        raise UserError(f"unknown pose model '{name}' (choices: {', '.join(POSE_MODEL_CHOICES)})")
    if name == "landmarks":
        return PoseEstimator()
    if name == "auto" and HOPENET_WEIGHTS not in files:
        logger.info("pose: HopeNet weights not present, using the landmark fit (see `apple-video weights where`)")
        return PoseEstimator()
    return PoseEstimator(load_hopenet(files(HOPENET_WEIGHTS)))

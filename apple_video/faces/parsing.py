"""Face parsing with facexlib's BiSeNet (CelebAMask-HQ 19 classes) from local weights."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from apple_video import weights
from apple_video.weights import ModelFiles

if TYPE_CHECKING:  # torch and facexlib load only when parsing is used (classic runs stay light)
    import torch
    from facexlib.parsing.bisenet import BiSeNet

logger = logging.getLogger(__name__)

PARSING_WEIGHTS = "bisenet-parsing"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FaceParser:
    """Per-pixel CelebAMask-HQ labels for an aligned face crop."""

    def __init__(self, model: BiSeNet, device: torch.device | str = "cpu") -> None:
        import torch

        self.model = model.eval().to(device)
        self.device = torch.device(device)

    @classmethod
    def from_weights(cls, path: Path, device: torch.device | str = "cpu") -> FaceParser:
        """The network from facexlib's parsing_bisenet.pth at `path` (the planner resolved it)."""
        from facexlib.parsing.bisenet import BiSeNet

        model = BiSeNet(num_class=19)
        refused = f"{path} is not a facexlib parsing_bisenet.pth"
        state = weights.load_checkpoint(path, refused)
        with weights.refused_as(refused, errors=(RuntimeError, ValueError)):
            model.load_state_dict(state, strict=True)
        return cls(model, device)

    def labels(self, crop: np.ndarray) -> np.ndarray:
        import torch

        size = crop.shape[0]
        image = cv2.resize(crop, (512, 512), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
        tensor = torch.from_numpy((image - IMAGENET_MEAN) / IMAGENET_STD).permute(2, 0, 1)[None].float().to(self.device)
        with torch.no_grad():
            labels = self.model(tensor)[0].argmax(1)[0].cpu().numpy().astype(np.uint8)
        return cv2.resize(labels, (size, size), interpolation=cv2.INTER_NEAREST)


def parser_files(name: str) -> ModelFiles:
    """What a parser choice needs, for a planner: `bisenet` its file (a WeightsError when it is missing), `auto` the
    file when it is present, `landmarks` nothing."""
    if name == "bisenet":
        return ModelFiles.resolve([PARSING_WEIGHTS])
    return ModelFiles.present([PARSING_WEIGHTS]) if name == "auto" else ModelFiles()


def create_parser(name: str, files: ModelFiles, announce: bool = True) -> FaceParser | None:
    """`bisenet` (its file resolved in `files`), `landmarks` (none), `auto` (bisenet when `files` has its file)."""
    if name == "landmarks":
        return None
    if name == "bisenet" or PARSING_WEIGHTS in files:
        return FaceParser.from_weights(files(PARSING_WEIGHTS))
    if announce:
        logger.info("face masks from landmarks (BiSeNet parsing weights not found; see `apple-video weights where`)")
    return None

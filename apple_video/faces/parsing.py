"""Face parsing with facexlib's BiSeNet (CelebAMask-HQ 19 classes) from local weights."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import cv2
import numpy as np

from apple_video import weights

if TYPE_CHECKING:  # torch and facexlib load only when parsing is used (classic runs stay light)
    import torch
    from facexlib.parsing.bisenet import BiSeNet

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FaceParser:
    """Per-pixel CelebAMask-HQ labels for an aligned face crop."""

    def __init__(self, model: BiSeNet, device: torch.device | str = "cpu") -> None:
        import torch

        self.model = model.eval().to(device)
        self.device = torch.device(device)

    @classmethod
    def from_weights(cls, device: torch.device | str = "cpu") -> FaceParser:
        from facexlib.parsing.bisenet import BiSeNet

        path = weights.require("bisenet-parsing")
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


def create_parser(name: str, announce: bool = True) -> FaceParser | None:
    """`bisenet` (weights required), `landmarks` (none), `auto` (bisenet when its weights are present)."""
    if name == "landmarks":
        return None
    if name == "bisenet" or weights.is_present("bisenet-parsing"):
        return FaceParser.from_weights()
    if announce:
        logger.info("face masks from landmarks (BiSeNet parsing weights not found; see `apple-video weights where`)")
    return None

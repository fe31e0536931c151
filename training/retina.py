"""facexlib's RetinaFace (ResNet-50) 5 points, which PuLID (and so the official trainer) aligns EVA-CLIP's input on.

PuLID's `FaceRestoreHelper.get_face_landmarks_5(only_center_face=True)`: detections above 0.97 on the BGR image,
the one nearest the image centre, its 5 landmarks (eyes, nose, mouth corners). The weights are facexlib's
`detection_Resnet50_Final.pth` (its `module.` prefixes dropped, as facexlib does), read from the catalogue.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from apple_video import weights

THRESHOLD = 0.97


def load_retinaface(path: Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    from facexlib.detection.retinaface import RetinaFace

    with warnings.catch_warnings():  # facexlib still passes torchvision's deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        model = RetinaFace(network_name="resnet50", half=False, device=device)
    refused = f"{path} is not facexlib's detection_Resnet50_Final.pth"
    state = weights.load_checkpoint(path, refused)
    with weights.refused_as(refused):  # foreign layouts
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
    return model.eval().to(device)


class RetinaPoints:
    """RGB image -> the 5 points of the face nearest its centre, or None."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @classmethod
    def from_weights(cls, path: Path) -> RetinaPoints:
        """From facexlib's detection_Resnet50_Final.pth (`retinaface-resnet50`, as the planner resolved it)."""
        return cls(load_retinaface(path))

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray) -> np.ndarray | None:
        found = self.model.detect_faces(np.ascontiguousarray(rgb[..., ::-1]), THRESHOLD)
        if len(found) == 0:
            return None
        centre = np.array([rgb.shape[1] / 2, rgb.shape[0] / 2])
        middles = (found[:, 0:2] + found[:, 2:4]) / 2
        best = int(np.argmin(np.linalg.norm(middles - centre, axis=1)))
        return np.asarray(found[best, 5:15], np.float32).reshape(5, 2)

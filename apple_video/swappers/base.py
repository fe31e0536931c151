"""The Swapper interface shared by the diffusion (APPLE) and classic (landmark warp) swappers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from apple_video.faces.align import alignment_matrix
from apple_video.faces.types import SourceFace


class SwapSkipped(Exception):
    """This crop cannot be swapped (e.g. the warp would fold); the frame passes through and is counted."""


@dataclass
class CropJob:
    """One aligned target face, ready for a swapper."""

    crop: np.ndarray  # (S, S, 3) uint8
    landmarks: np.ndarray | None  # (68, 2) in crop space, when known
    seed: int  # the same for every frame of a track (the student recipe's noise must not change per frame)


class Swapper(Protocol):
    """What the engine reads of a swapper: every member here, nothing else."""

    name: str
    crop_size: int
    real: bool  # False for random-weight presets: runs every stage but is not a real swap
    per_crop: bool  # True: each crop is swapped on its own (a batch's size never changes a result)

    def prepare(self, sources: list[SourceFace]) -> None: ...

    def auto_batch_size(self) -> int:
        """Crops per `swap` call when the user asked for `--batch-size auto`."""

    def crop_matrix(self, kps: np.ndarray, landmarks: np.ndarray | None) -> np.ndarray:
        """Frame -> crop transform of a target face (5 keypoints, 68 landmarks when known)."""

    def swap(self, jobs: list[CropJob]) -> list[np.ndarray | None]:
        """Swapped crops in job order; None where a crop was skipped (it then passes through)."""


def ffhq_crop_matrix(kps: np.ndarray, size: int) -> np.ndarray:
    """The FFHQ 5-point alignment the diffusion models were trained on (a swapper's default `crop_matrix`)."""
    return alignment_matrix(kps, size)

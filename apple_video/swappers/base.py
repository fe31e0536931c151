"""The Swapper interface shared by the diffusion (APPLE) and classic (landmark warp) swappers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from apple_video.errors import NoFaceError
from apple_video.faces.align import alignment_matrix, transform_points, warp_crop
from apple_video.faces.detect import FaceDetector
from apple_video.faces.select import sort_faces
from apple_video.faces.types import Face

logger = logging.getLogger(__name__)


class SwapSkipped(Exception):
    """This crop cannot be swapped (e.g. the warp would fold); the frame passes through and is counted."""


@dataclass
class CropJob:
    """One aligned target face, ready for a swapper."""

    crop: np.ndarray  # (S, S, 3) uint8
    landmarks: np.ndarray | None  # (68, 2) in crop space, when known
    seed: int


@dataclass
class SourceFace:
    """A source face detected and aligned once per job."""

    image: np.ndarray  # the whole photo (RGB)
    face: Face
    crop: np.ndarray  # aligned crop at the swapper's size
    landmarks: np.ndarray | None  # (68, 2) in crop space


class Swapper(Protocol):
    name: str
    crop_size: int
    real: bool  # False for random-weight presets: runs every stage but is not a real swap

    def prepare(self, sources: list[SourceFace]) -> None: ...

    def swap(self, jobs: list[CropJob]) -> list[np.ndarray | None]:
        """Swapped crops in job order; None where a crop was skipped (it then passes through)."""


def source_faces(images: list[np.ndarray], names: list[str], detector: FaceDetector, size: int) -> list[SourceFace]:
    """Detect the largest face in each source photo and align it; one-line errors for photos without a face."""
    sources = []
    for image, name in zip(images, names, strict=True):
        faces = detector.detect(image)
        if not faces:
            raise NoFaceError(f"no face found in the source photo {name}; use a clear, frontal photo of one face")
        if len(faces) > 1:
            logger.warning("%s has %d faces; using the largest", name, len(faces))
        face = sort_faces(faces, "large-small")[0]
        matrix = alignment_matrix(face.kps, size)
        landmarks = transform_points(face.landmarks, matrix) if face.landmarks is not None else None
        sources.append(SourceFace(image, face, warp_crop(image, matrix, size), landmarks))
    return sources

"""Records passed between the face stages."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Face:
    """One detected face in one frame (display orientation, pixel coordinates)."""

    bbox: np.ndarray  # (4,) x0, y0, x1, y1
    kps: np.ndarray  # (5, 2) left eye, right eye, nose, left mouth corner, right mouth corner
    score: float
    landmarks: np.ndarray | None = None  # (68, 2) when the detector gives them
    embedding: np.ndarray | None = None  # identity embedding (backend-specific length)

    @property
    def area(self) -> float:
        return float(max(0.0, self.bbox[2] - self.bbox[0]) * max(0.0, self.bbox[3] - self.bbox[1]))

    @property
    def size(self) -> float:
        return float(min(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1]))


@dataclass
class FaceTarget:
    """A face chosen for swapping in one frame, after tracking and smoothing."""

    frame_index: int
    track_id: int
    kps: np.ndarray  # (5, 2) smoothed
    landmarks: np.ndarray | None = None  # (68, 2) smoothed
    interpolated: bool = False


@dataclass
class Track:
    track_id: int
    frames: list[int] = field(default_factory=list)
    faces: list[Face] = field(default_factory=list)

    def embedding(self) -> np.ndarray | None:
        embeddings = [f.embedding for f in self.faces if f.embedding is not None]
        if not embeddings:
            return None
        mean = np.mean(embeddings, axis=0)
        return mean


@dataclass
class SourceFace:
    """A source face detected and aligned once per job."""

    image: np.ndarray  # the whole photo (RGB)
    face: Face
    crop: np.ndarray  # aligned crop at the swapper's size
    landmarks: np.ndarray | None  # (68, 2) in crop space
    eva_kps: np.ndarray | None = None  # (5, 2) in image space when EVA-CLIP aligns on other points than ArcFace

"""Source photos -> aligned source faces, once per job."""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from apple_video.errors import NoFaceError
from apple_video.faces.align import alignment_matrix, transform_points, warp_crop
from apple_video.faces.detect import FaceDetector, detect_faces
from apple_video.faces.select import sort_faces
from apple_video.faces.types import SourceFace

logger = logging.getLogger(__name__)

SOURCE_MAX_SIDE = 1024  # the official inference shrinks the source photo to this long side (LANCZOS) before all else


def presize_source(rgb: np.ndarray) -> np.ndarray:
    """A source photo as the official inference sees it: long side at most SOURCE_MAX_SIDE, LANCZOS. Detection,
    identity embeddings and the aligned crops all start from this picture (swap, preview, eval and training)."""
    h, w = rgb.shape[:2]
    if max(h, w) <= SOURCE_MAX_SIDE:
        return rgb
    scale = SOURCE_MAX_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize(size, Image.LANCZOS))


def source_faces(images: list[np.ndarray], names: list[str], detector: FaceDetector, size: int) -> list[SourceFace]:
    """Detect the largest face in each source photo and align it; one-line errors for photos without a face."""
    sources = []
    for image, name in zip(images, names, strict=True):
        image = presize_source(image)
        faces = detect_faces(detector, image)
        if not faces:
            raise NoFaceError(f"no face found in the source photo {name}; use a clear, frontal photo of one face")
        if len(faces) > 1:
            logger.warning("%s has %d faces; using the largest", name, len(faces))
        face = sort_faces(faces, "large-small")[0]
        matrix = alignment_matrix(face.kps, size)
        landmarks = transform_points(face.landmarks, matrix) if face.landmarks is not None else None
        sources.append(SourceFace(image, face, warp_crop(image, matrix, size), landmarks))
    return sources

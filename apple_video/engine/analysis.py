"""Stage 2's work on a chunk: detect faces (boxes, landmarks, identity embeddings) on every frame, and the faces
as the JSON records the driver keeps in the job folder."""

from __future__ import annotations

import numpy as np

from apple_video.faces.detect import FaceDetector
from apple_video.faces.follow import follow_frames
from apple_video.faces.types import Face


def face_to_dict(face: Face) -> dict:
    return {
        "bbox": face.bbox.tolist(),
        "kps": face.kps.tolist(),
        "score": face.score,
        "landmarks": None if face.landmarks is None else face.landmarks.tolist(),
        "embedding": None if face.embedding is None else face.embedding.tolist(),
    }


def face_from_dict(data: dict) -> Face:
    def arr(key: str) -> np.ndarray | None:
        return None if data[key] is None else np.asarray(data[key], np.float64)

    return Face(arr("bbox"), arr("kps"), float(data["score"]), arr("landmarks"), arr("embedding"))


class Analyzer:
    """Detect faces (boxes, landmarks, embeddings) on every frame of a chunk."""

    def __init__(self, detector: FaceDetector, embed_every: int = 24) -> None:
        self.detector = detector
        self.embed_every = embed_every

    def analyze(self, frames) -> dict[int, list[Face]]:
        """Identity embeddings (costly) only every `embed_every` frames and where the face count changes:
        tracks average them, which is all selection needs."""
        found: dict[int, list[Face]] = {}
        previous = -1
        for index, rgb, faces, scale in follow_frames(self.detector, frames):
            if faces and (index % self.embed_every == 0 or len(faces) != previous):
                faces = (self.detector.embed(rgb, faces) if self.detector.settings.angles == (0,)
                         else self.detector.detect(rgb, True, scale))
            previous = len(faces)
            found[index] = faces
        return found

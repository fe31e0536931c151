"""Training test data shared by the training tests: aligned crops of real face variants and a fixed sampler."""

from __future__ import annotations

import numpy as np

from tests import synth

Aligned = tuple[np.ndarray, np.ndarray, np.ndarray]  # crop, its 68 landmarks, the face's embedding


def aligned_faces(astronaut: np.ndarray, detector, count: int, size: int = 128) -> list[Aligned]:
    """`count` variants of the astronaut's face, aligned to `size` crops, with their landmarks and embeddings."""
    from apple_video.faces.align import alignment_matrix, transform_points, warp_crop

    out = []
    for image in synth.face_variants(astronaut, synth.ASTRONAUT_FACE_BOX, count, seed=3):
        face = detector.detect(image)[0]
        matrix = alignment_matrix(face.kps, size)
        out.append((warp_crop(image, matrix, size), transform_points(face.landmarks, matrix), face.embedding))
    return out


class FixedSampler:
    """The same faces in every batch, in order (cycled when a batch is larger than the list)."""

    def __init__(self, faces: list[Aligned]) -> None:
        self.faces = faces

    def batch(self, rng, size: int):
        from training.deblur import teacher_condition
        from training.loop import Batch, IdentityImage

        items = [self.faces[i % len(self.faces)] for i in range(size)]
        return Batch(np.stack([c for c, _, _ in items]), np.stack([teacher_condition(c, lm) for c, lm, _ in items]),
                     [IdentityImage(c, lm, e, i) for i, (c, lm, e) in enumerate(items)])

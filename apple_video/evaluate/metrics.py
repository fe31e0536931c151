"""`apple-video eval`: how well a swap kept the target's attributes and moved toward the source identity.

Offline metrics on dlib's models (the ones every machine has), per frame where both the original and the
swapped frame show a face:
- identity: cosine similarity of the swapped face to the source (dlib 128-D), and how often the swapped face
  is closer to the source than to the original face;
- pose error: L2 of (yaw, pitch, roll) differences in degrees, head pose from 68 landmarks by solvePnP;
- expression error: mean distance of the aligned mouth/eye/brow landmarks, in % of the inter-ocular distance;
- temporal: landmark jitter (mean |second difference|) of the swapped track over the original's (videos);
- background: PSNR outside the detected face boxes (dB).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from apple_video.errors import InputError, NoFaceError
from apple_video.faces.align import similarity_from_points, transform_points
from apple_video.faces.detect import DetectorSettings, create_detector
from apple_video.faces.select import sort_faces
from apple_video.media.images import is_image_path, read_image
from apple_video.media.video import decode_frames, probe, to_display

# A generic 3D face (mm) in camera axes (x right, y down, z away from the camera): nose tip, chin, eye outer
# corners, mouth corners (iBUG indices 30, 8, 36, 45, 48, 54). A frontal face then has zero rotation.
MODEL_3D = np.array([[0.0, 0.0, 0.0], [0.0, 63.6, 12.5], [-43.3, -32.7, 26.0], [43.3, -32.7, 26.0],
                     [-28.9, 28.9, 24.1], [28.9, 28.9, 24.1]])
POSE_POINTS = [30, 8, 36, 45, 48, 54]
EXPRESSION_POINTS = list(range(17, 27)) + list(range(36, 48)) + list(range(48, 68))


@dataclass
class Metrics:
    frames: int
    frames_compared: int
    id_similarity: float
    id_closer_to_source: float
    pose_error_deg: float
    expression_error_pct: float
    jitter_ratio: float | None
    background_psnr_db: float


def head_pose(landmarks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(yaw, pitch, roll) in degrees from 68 landmarks with a pinhole camera guess."""
    h, w = size
    camera = np.array([[w, 0, w / 2], [0, w, h / 2], [0, 0, 1]], np.float64)
    ok, rvec, _ = cv2.solvePnP(MODEL_3D, landmarks[POSE_POINTS].astype(np.float64), camera, None,
                               flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        return np.full(3, np.nan)
    rot, _ = cv2.Rodrigues(rvec)
    pitch = math.degrees(math.atan2(rot[2, 1], rot[2, 2]))
    yaw = math.degrees(math.atan2(-rot[2, 0], math.hypot(rot[2, 1], rot[2, 2])))
    roll = math.degrees(math.atan2(rot[1, 0], rot[0, 0]))
    return np.array([yaw, pitch, roll])


def expression_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Landmark distance after a similarity alignment of b onto a, in % of a's inter-ocular distance."""
    matrix = similarity_from_points(b, a)
    aligned = transform_points(b, matrix)
    iod = np.linalg.norm(a[36:42].mean(0) - a[42:48].mean(0))
    return float(np.linalg.norm(aligned[EXPRESSION_POINTS] - a[EXPRESSION_POINTS], axis=1).mean() / iod * 100)


def _frames(path: Path) -> list[np.ndarray]:
    if is_image_path(path):
        return [read_image(path).rgb]
    info = probe(path)
    return [to_display(f.rgb, info.rotation) for f in decode_frames(info)]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)) if a.size else 0.0
    return 99.0 if mse == 0 else 10 * math.log10(255**2 / mse)


def evaluate(source: Path, original: Path, swapped: Path) -> Metrics:
    detector = create_detector(DetectorSettings(name="dlib"), announce=False)
    src_faces = detector.detect(read_image(source).rgb)
    if not src_faces:
        raise NoFaceError(f"no face found in the source photo {source}")
    src = sort_faces(src_faces, "large-small")[0].embedding
    before, after = _frames(original), _frames(swapped)
    if len(before) != len(after):
        raise InputError(f"{original} has {len(before)} frames but {swapped} has {len(after)}: not the same clip")
    sims, closer, poses, expressions, lm_before, lm_after, psnr = [], [], [], [], [], [], []
    for a, b in zip(before, after, strict=True):
        fa, fb = detector.detect(a), detector.detect(b)
        keep = np.ones(a.shape[:2], bool)
        for face in fa + fb:
            x0, y0, x1, y1 = face.bbox.astype(int)
            pad = int(0.3 * (x1 - x0))
            keep[max(0, y0 - pad) : y1 + pad, max(0, x0 - pad) : x1 + pad] = False
        psnr.append(_psnr(a[keep], b[keep]))
        if not fa or not fb:
            continue
        fa, fb = sort_faces(fa, "large-small")[0], sort_faces(fb, "large-small")[0]
        cos = float(np.dot(fb.embedding, src) / (np.linalg.norm(fb.embedding) * np.linalg.norm(src)))
        sims.append(cos)
        closer.append(np.linalg.norm(fb.embedding - src) < np.linalg.norm(fb.embedding - fa.embedding))
        poses.append(float(np.linalg.norm(head_pose(fa.landmarks, a.shape[:2]) - head_pose(fb.landmarks, b.shape[:2]))))
        expressions.append(expression_distance(fa.landmarks, fb.landmarks))
        lm_before.append(fa.landmarks)
        lm_after.append(fb.landmarks)
    if not sims:
        raise NoFaceError("no frame shows a face in both the original and the swapped media")
    jitter = None
    if len(lm_before) >= 3:
        j_before = np.abs(np.diff(np.stack(lm_before), n=2, axis=0)).mean()
        j_after = np.abs(np.diff(np.stack(lm_after), n=2, axis=0)).mean()
        jitter = float(j_after / max(j_before, 1e-9))
    return Metrics(len(before), len(sims), float(np.mean(sims)), float(np.mean(closer)), float(np.nanmean(poses)),
                   float(np.mean(expressions)), jitter, float(np.mean(psnr)))


def report(metrics: Metrics, json_path: Path | None = None) -> str:
    if json_path is not None:
        json_path.write_text(json.dumps(asdict(metrics), indent=1))
    jitter = "n/a" if metrics.jitter_ratio is None else f"{metrics.jitter_ratio:.2f}"
    return (f"frames compared {metrics.frames_compared}/{metrics.frames}: id similarity {metrics.id_similarity:.3f}, "
            f"closer to source {100 * metrics.id_closer_to_source:.0f}%, pose error {metrics.pose_error_deg:.2f} deg, "
            f"expression error {metrics.expression_error_pct:.1f}%, jitter ratio {jitter}, "
            f"background PSNR {metrics.background_psnr_db:.1f} dB")

"""Head pose and expression from 68 landmarks (iBUG layout, as dlib gives them).

The paper measures pose with HopeNet (`pose.py` runs it where its weights are present; this fit is the fallback)
and expression with Deep3DFaceRecon expression coefficients. Pose here is in the same unit (L2 of the wrapped
yaw/pitch/roll differences in degrees); expression is a landmark distance, so its scale is not the paper's.

The pose fit: solvePnP's first solution is, on small or noisy faces, often the flipped one (roll or pitch read
~180 degrees off). Every candidate of SQPnP and of the iterative solver (from scratch, and from the previous
frame's pose along a track) is scored; those facing the camera compete on reprojection error, and a frame whose
best fit is still poor is missing rather than a number to average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from apple_video.faces.align import similarity_from_points, transform_points

POSE_MODEL = ("solvePnP on dlib 68 landmarks (6 points of a generic 3D face; SQPnP and iterative candidates, "
              "the best-fitting one facing the camera; a fit off by over "
              "{:.0%} of the face's size is missing)")
EXPRESSION_MODEL = ("dlib 68 landmarks: mean distance of brow/eye/mouth points after a similarity alignment, "
                    "% of the inter-ocular distance")

# A generic 3D face (mm) in camera axes (x right, y down, z away from the camera): nose tip, chin, eye outer
# corners, mouth corners (iBUG indices 30, 8, 36, 45, 48, 54). A frontal face then has zero rotation.
MODEL_3D = np.array([[0.0, 0.0, 0.0], [0.0, 63.6, 12.5], [-43.3, -32.7, 26.0], [43.3, -32.7, 26.0],
                     [-28.9, 28.9, 24.1], [28.9, 28.9, 24.1]])
POSE_POINTS = [30, 8, 36, 45, 48, 54]
EXPRESSION_POINTS = list(range(17, 27)) + list(range(36, 48)) + list(range(48, 68))
# RMS reprojection error of the 6 points over their RMS spread. Real dlib landmarks against the generic face:
# 0.07-0.14 on the package photos, median 0.15 and at most 0.19 over 240 frames of talking clips (the jaw moves);
# 6 random points: 5th percentile 0.58. Beyond this bound a fit is not a pose and is reported as missing.
MAX_FIT_ERROR = 0.3
POSE_MODEL = POSE_MODEL.format(MAX_FIT_ERROR)


@dataclass(frozen=True)
class PoseFit:
    """One frame's head pose: (yaw, pitch, roll) in degrees (NaN when missing), the solver's rotation and
    translation (a guess for the next frame of a track), and the fit's relative reprojection error."""

    angles: np.ndarray
    rvec: np.ndarray | None = None
    tvec: np.ndarray | None = None
    error: float = math.inf

    @property
    def found(self) -> bool:
        return bool(np.all(np.isfinite(self.angles)))


MISSING = PoseFit(np.full(3, np.nan))


def camera_matrix(size: tuple[int, int]) -> np.ndarray:
    """A pinhole camera guess for an image of `size` (h, w): focal length = width, centre in the middle."""
    h, w = size
    return np.array([[w, 0, w / 2], [0, w, h / 2], [0, 0, 1]], np.float64)


def euler_angles(rotation: np.ndarray) -> np.ndarray:
    """(yaw, pitch, roll) in degrees of rotation = Rz(roll) @ Ry(yaw) @ Rx(pitch)."""
    pitch = math.degrees(math.atan2(rotation[2, 1], rotation[2, 2]))
    yaw = math.degrees(math.atan2(-rotation[2, 0], math.hypot(rotation[2, 1], rotation[2, 2])))
    roll = math.degrees(math.atan2(rotation[1, 0], rotation[0, 0]))
    return np.array([yaw, pitch, roll])


def rotation_from_euler(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """The inverse of `euler_angles` (degrees)."""
    y, p, r = np.radians([yaw, pitch, roll])
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def wrap_degrees(delta: np.ndarray) -> np.ndarray:
    """Angle differences wrapped to (-180, 180]."""
    return -np.mod(-np.asarray(delta, np.float64) + 180.0, 360.0) + 180.0


def _candidates(points: np.ndarray, camera: np.ndarray, previous: PoseFit | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every solution SQPnP returns, the iterative solver's from scratch, and, along a track, the iterative
    solver's from the previous frame's pose."""
    found: list[tuple[np.ndarray, np.ndarray]] = []
    count, rvecs, tvecs, _ = cv2.solvePnPGeneric(MODEL_3D, points, camera, None, flags=cv2.SOLVEPNP_SQPNP)
    found += [(r, t) for r, t in zip(rvecs[:count], tvecs[:count], strict=True)]
    ok, rvec, tvec = cv2.solvePnP(MODEL_3D, points, camera, None, flags=cv2.SOLVEPNP_ITERATIVE)
    if ok:
        found.append((rvec, tvec))
    if previous is not None and previous.found and previous.rvec is not None:
        ok, rvec, tvec = cv2.solvePnP(MODEL_3D, points, camera, None, previous.rvec.copy(), previous.tvec.copy(),
                                      useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
        if ok:
            found.append((rvec, tvec))
    return found


def fit_pose(landmarks: np.ndarray, size: tuple[int, int], previous: PoseFit | None = None,
             max_error: float = MAX_FIT_ERROR) -> PoseFit:
    """The head pose of 68 landmarks: among the solvers' candidates that put the face in front of the camera and
    facing it, the one with the least reprojection error; MISSING when even that one is off by `max_error`."""
    points = np.ascontiguousarray(landmarks[POSE_POINTS], np.float64)
    spread = float(np.sqrt(((points - points.mean(0)) ** 2).sum(1).mean()))
    if not np.all(np.isfinite(points)) or spread < 1e-6:
        return MISSING
    camera = camera_matrix(size)
    best = MISSING
    for rvec, tvec in _candidates(points, camera, previous):
        rotation, _ = cv2.Rodrigues(rvec)
        # the face's depth axis (model +z, from the face into the head) must point away from the camera
        if tvec[2, 0] <= 0 or rotation[2, 2] <= 0:
            continue
        projected, _ = cv2.projectPoints(MODEL_3D, rvec, tvec, camera, None)
        error = float(np.sqrt(((projected[:, 0] - points) ** 2).sum(1).mean())) / spread
        if error < best.error:
            best = PoseFit(euler_angles(rotation), rvec, tvec, error)
    return best if best.error <= max_error else MISSING


def head_pose(landmarks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(yaw, pitch, roll) in degrees from 68 landmarks (NaN when the fit is bad)."""
    return fit_pose(landmarks, size).angles


def pose_distance(a: np.ndarray, b: np.ndarray) -> float:
    """L2 of the wrapped (yaw, pitch, roll) differences in degrees, as the paper's HopeNet metric; NaN when
    either pose is missing."""
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.nan
    return float(np.linalg.norm(wrap_degrees(np.asarray(a) - np.asarray(b))))


def pose_error(a: np.ndarray, b: np.ndarray, size_a: tuple[int, int], size_b: tuple[int, int]) -> float:
    """Pose distance of two faces' 68 landmarks (NaN when either fit is bad)."""
    if np.array_equal(a, b) and size_a == size_b:
        return 0.0 if fit_pose(a, size_a).found else math.nan
    return pose_distance(head_pose(a, size_a), head_pose(b, size_b))


def expression_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Landmark distance after a similarity alignment of b onto a, in % of a's inter-ocular distance."""
    if np.array_equal(a, b):
        return 0.0
    matrix = similarity_from_points(b, a)
    aligned = transform_points(b, matrix)
    iod = np.linalg.norm(a[36:42].mean(0) - a[42:48].mean(0))
    return float(np.linalg.norm(aligned[EXPRESSION_POINTS] - a[EXPRESSION_POINTS], axis=1).mean() / iod * 100)

"""Head pose and expression from 68 landmarks (iBUG layout, as dlib gives them).

These are the offline stand-ins for the paper's models: the paper measures pose with HopeNet and expression
with Deep3DFaceRecon expression coefficients. Pose here is in the same unit (L2 of yaw/pitch/roll differences
in degrees); expression is a landmark distance, so its scale is not the paper's.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from apple_video.faces.align import similarity_from_points, transform_points

POSE_MODEL = "solvePnP on dlib 68 landmarks (6 points of a generic 3D face)"
EXPRESSION_MODEL = ("dlib 68 landmarks: mean distance of brow/eye/mouth points after a similarity alignment, "
                    "% of the inter-ocular distance")

# A generic 3D face (mm) in camera axes (x right, y down, z away from the camera): nose tip, chin, eye outer
# corners, mouth corners (iBUG indices 30, 8, 36, 45, 48, 54). A frontal face then has zero rotation.
MODEL_3D = np.array([[0.0, 0.0, 0.0], [0.0, 63.6, 12.5], [-43.3, -32.7, 26.0], [43.3, -32.7, 26.0],
                     [-28.9, 28.9, 24.1], [28.9, 28.9, 24.1]])
POSE_POINTS = [30, 8, 36, 45, 48, 54]
EXPRESSION_POINTS = list(range(17, 27)) + list(range(36, 48)) + list(range(48, 68))


def head_pose(landmarks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(yaw, pitch, roll) in degrees from 68 landmarks with a pinhole camera guess (focal length = width)."""
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


def pose_error(a: np.ndarray, b: np.ndarray, size_a: tuple[int, int], size_b: tuple[int, int]) -> float:
    """L2 distance of (yaw, pitch, roll) in degrees, as the paper's HopeNet metric."""
    if np.array_equal(a, b) and size_a == size_b:
        return 0.0
    return float(np.linalg.norm(head_pose(a, size_a) - head_pose(b, size_b)))


def expression_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Landmark distance after a similarity alignment of b onto a, in % of a's inter-ocular distance."""
    if np.array_equal(a, b):
        return 0.0
    matrix = similarity_from_points(b, a)
    aligned = transform_points(b, matrix)
    iod = np.linalg.norm(a[36:42].mean(0) - a[42:48].mean(0))
    return float(np.linalg.norm(aligned[EXPRESSION_POINTS] - a[EXPRESSION_POINTS], axis=1).mean() / iod * 100)

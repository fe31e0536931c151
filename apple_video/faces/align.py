"""5-point similarity alignment to the FFHQ-style 512 template (facexlib/PuLID convention) and its inverse."""

from __future__ import annotations

import cv2
import numpy as np

# facexlib's FaceRestoreHelper template for 512x512 crops (eyes, nose, mouth corners).
TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043], [313.08905, 371.15118]],
    dtype=np.float64,
)


def template(size: int) -> np.ndarray:
    return TEMPLATE_512 * (size / 512.0)


def similarity_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src -> dst, as a 2x3 matrix (Umeyama)."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    scale = np.trace(np.diag(sig) @ sign) / s.var(0).sum()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rot
    matrix[:, 2] = mu_d - scale * rot @ mu_s
    return matrix


def alignment_matrix(kps: np.ndarray, size: int) -> np.ndarray:
    """Frame -> crop transform for a face with 5 keypoints."""
    return similarity_from_points(kps, template(size))


def invert(matrix: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(matrix)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    points = np.asarray(points, np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def matrix_scale(matrix: np.ndarray) -> float:
    """The uniform scale of a similarity (crop pixels per frame pixel)."""
    return float(np.sqrt(abs(np.linalg.det(np.asarray(matrix, np.float64)[:, :2]))))


def antialias_sigma(scale: float) -> float:
    """Gaussian pre-blur (frame pixels) before shrinking by `scale` < 1: no detail finer than the crop's pixel
    survives to alias (a little softer than an area filter, far from the moiré of plain bilinear decimation)."""
    return 0.5 * float(np.sqrt(1.0 / scale**2 - 1.0)) if scale < 1.0 else 0.0


def warp_crop(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """The aligned crop: low-passed at the scale factor when it shrinks the face (a 900 px face into a 512 crop),
    bilinear otherwise; where the crop leaves the frame the frame's edge is replicated (never a mirror image of
    the frame, which a parser or a model could take for a face). Those pixels map outside the frame, so the paste
    never writes them back."""
    sigma = antialias_sigma(matrix_scale(matrix))
    if sigma > 0.3:
        image, matrix = _blurred_region(image, matrix, size, sigma)
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def _blurred_region(image: np.ndarray, matrix: np.ndarray, size: int,
                    sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """The part of `image` the crop reads, blurred by `sigma`, and the matrix shifted onto it (blurring a whole 4K
    frame for one face would cost 10x more)."""
    corners = transform_points(np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64), invert(matrix))
    margin = int(np.ceil(3 * sigma)) + 2
    h, w = image.shape[:2]
    x0, y0 = np.maximum(np.floor(corners.min(0)).astype(int) - margin, 0)
    x1, y1 = np.minimum(np.ceil(corners.max(0)).astype(int) + margin, (w, h))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return image, matrix
    region = cv2.GaussianBlur(np.ascontiguousarray(image[y0:y1, x0:x1]), (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    shifted = np.asarray(matrix, np.float64).copy()
    shifted[:, 2] += shifted[:, :2] @ np.array([x0, y0], np.float64)
    return region, shifted


def kps_from_68(landmarks: np.ndarray) -> np.ndarray:
    """The 5 alignment points (eye centres, nose tip, mouth corners) from 68 iBUG landmarks."""
    lm = np.asarray(landmarks, np.float64)
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])

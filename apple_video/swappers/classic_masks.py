"""The classic swapper's masks, in crop space: the inner face (no hairline, ears or background), the mouth
interior, the skin by colour, soft edges."""

from __future__ import annotations

import cv2
import numpy as np

from apple_video.faces.mask import face_height


def inner_outline(landmarks: np.ndarray, lift: float = 0.12, shrink: float = 0.06) -> np.ndarray:
    """Jaw + brows lifted by `lift` of the face height, pulled toward the eyes and nose by `shrink`:
    the part of a face that is face in any photo (no hairline, ears, temples or background)."""
    lm = np.asarray(landmarks, np.float64)
    outline = np.concatenate([lm[0:17], (lm[17:27] - face_height(lm) * lift)[::-1]])
    centre = lm[27:48].mean(0)  # nose and eyes: a centre that stays put when the jaw moves
    return centre + (outline - centre) * (1.0 - shrink)


def inner_face_mask(landmarks: np.ndarray, size: int, lift: float = 0.12, shrink: float = 0.06) -> np.ndarray:
    """Binary (0/255) convex mask of `inner_outline` in crop space."""
    hull = cv2.convexHull(inner_outline(landmarks, lift, shrink).astype(np.float32))
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(hull).astype(np.int32)], 255)
    return mask


def mouth_interior_mask(landmarks: np.ndarray, size: int, grow: int = 0) -> np.ndarray:
    """Binary (0/255) mask of the inner-lip polygon (iBUG 60-67), dilated by `grow` pixels; empty when closed."""
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(np.asarray(landmarks, np.float64)[60:68] * 16).astype(np.int32)], 255,
                 lineType=cv2.LINE_AA, shift=4)
    mask = np.where(mask >= 128, 255, 0).astype(np.uint8)
    if grow > 0 and mask.any():
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))
        mask = cv2.dilate(mask, kernel)
    return mask


def skin_mask(rgb: np.ndarray, landmarks: np.ndarray, tolerance: float = 3.5) -> np.ndarray:
    """Binary (0/255) mask of pixels whose Lab colour is close to the cheeks' (robust median/MAD per channel):
    tells forehead skin from a hat, hair or background without a parsing model."""
    lm = np.asarray(landmarks, np.float64)
    h, w = rgb.shape[:2]
    cheeks = np.zeros((h, w), np.uint8)
    for side in ([1, 2, 3, 4, 48, 31, 39], [15, 14, 13, 12, 54, 35, 42]):
        points = lm[side]
        points = points + (lm[30] - points) * 0.35  # well inside the jaw line: a backdrop beside it is not skin
        cv2.fillPoly(cheeks, [np.round(cv2.convexHull(points.astype(np.float32))).astype(np.int32)], 255)
    lab = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2LAB).astype(np.float32)
    samples = lab[cheeks > 0]
    if len(samples) < 32:
        return np.full((h, w), 255, np.uint8)
    median = np.median(samples, axis=0)
    spread = 1.4826 * np.median(np.abs(samples - median), axis=0) + np.float32([4.0, 2.0, 2.0])
    distance = np.abs(lab - median) / spread
    skin = (distance.max(axis=2) < tolerance).astype(np.uint8) * 255
    return cv2.morphologyEx(skin, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))


def soft_edge(mask: np.ndarray, radius: int) -> np.ndarray:
    """Float mask in [0, 1] that is 0 on and outside the edge of `mask` and rises over about `radius` pixels."""
    if radius <= 0:
        return (mask > 0).astype(np.float32)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    soft = cv2.GaussianBlur(cv2.erode(mask, kernel).astype(np.float32) / 255.0, (0, 0), radius / 2.0)
    soft[mask == 0] = 0.0
    return soft

"""Face masks in crop space: landmark hull (always available) or BiSeNet parsing (local weights); feathering.
The classic swapper's own masks live next to it (apple_video/swappers/classic_masks.py)."""

from __future__ import annotations

import cv2
import numpy as np

from apple_video.faces.align import template
from apple_video.settings import MASK_REGIONS, REGION_LABELS


def face_height(landmarks: np.ndarray) -> np.ndarray:
    """The nose-bridge-to-chin vector of a neutral face, from the nose alone (bridge 27 to tip 30, about a third of
    it): unlike the chin, the nose does not move when the mouth opens, so masks and warps built on it stay put."""
    lm = np.asarray(landmarks, np.float64)
    return (lm[30] - lm[27]) * 3.0


def hull_mask(landmarks: np.ndarray, size: int, regions: tuple[str, ...] = MASK_REGIONS) -> np.ndarray:
    """Binary mask from 68 landmarks in crop space: jaw + brows (lifted to the forehead), minus excluded parts."""
    lm = np.asarray(landmarks, np.float64)
    jaw, brows = lm[0:17], lm[17:27]
    lift = face_height(lm) * 0.25  # push brows up toward the forehead
    outline = np.concatenate([jaw, (brows - lift)[::-1]])
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(cv2.convexHull(outline.astype(np.float32))).astype(np.int32)], 255)
    if "mouth" not in regions:
        cv2.fillPoly(mask, [np.round(lm[60:68]).astype(np.int32)], 0)
    if "left-eye" not in regions:
        cv2.fillPoly(mask, [np.round(lm[42:48]).astype(np.int32)], 0)
    if "right-eye" not in regions:
        cv2.fillPoly(mask, [np.round(lm[36:42]).astype(np.int32)], 0)
    return mask


def oval_mask(size: int) -> np.ndarray:
    """A face oval fitted to the alignment template, for detectors that give only 5 points."""
    t = template(size)
    centre = ((t[0] + t[1]) / 2 + t[3:].mean(0)) / 2
    axes = (int(size * 0.30), int(size * 0.38))
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (int(centre[0]), int(centre[1] - size * 0.03)), axes, 0, 0, 360, 255, -1)
    return mask


def parsing_mask(labels: np.ndarray, regions: tuple[str, ...]) -> np.ndarray:
    keep = [label for region in regions for label in REGION_LABELS[region]]
    return np.where(np.isin(labels, keep), 255, 0).astype(np.uint8)


def pad_mask(mask: np.ndarray, padding: tuple[int, int, int, int]) -> np.ndarray:
    """Cut `padding` percent of the crop from each side (FaceFusion's --face-mask-padding)."""
    top, right, bottom, left = padding
    if not any(padding):
        return mask
    h, w = mask.shape
    out = mask.copy()
    out[: int(h * top / 100)] = 0
    out[h - int(h * bottom / 100):] = 0
    out[:, : int(w * left / 100)] = 0
    out[:, w - int(w * right / 100):] = 0
    return out


def feather(mask: np.ndarray, blur: float) -> np.ndarray:
    """Soft float mask in [0, 1]: erode by the feather width, then blur, so the edge falls inside the hull."""
    if blur <= 0:
        return (mask > 0).astype(np.float32)
    _, _, width, height = cv2.boundingRect(mask)
    if width == 0:
        return np.zeros(mask.shape, np.float32)
    extent = max(width, height) - 1
    radius = max(1, int(extent * blur * 0.1))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    eroded = cv2.erode(mask, kernel)
    soft = cv2.GaussianBlur(eroded.astype(np.float32) / 255.0, (0, 0), radius / 2 + 0.5)
    soft[mask == 0] = 0.0
    return soft

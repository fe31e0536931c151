"""Paste a swapped crop back into the frame: inverse warp, feathered blend; pixels outside the mask stay bit-exact."""

from __future__ import annotations

import cv2
import numpy as np

from apple_video.faces.align import invert


def mask_bounds(mask: np.ndarray, inverse: np.ndarray, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Frame-space box (x0, y0, x1, y1) covering the non-zero mask after the inverse warp."""
    x, y, width, height = cv2.boundingRect((mask > 0).astype(np.uint8))
    if width == 0:
        return None
    corners = np.array([[x, y], [x + width, y], [x, y + height], [x + width, y + height]], np.float64)
    mapped = corners @ inverse[:, :2].T + inverse[:, 2]
    h, w = shape
    x0, y0 = np.floor(mapped.min(0)).astype(int) - 2
    x1, y1 = np.ceil(mapped.max(0)).astype(int) + 2
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x0 >= x1 or y0 >= y1:
        return None
    return x0, y0, x1, y1


def paste_back(frame: np.ndarray, crop: np.ndarray, matrix: np.ndarray, soft_mask: np.ndarray) -> np.ndarray:
    """Blend `crop` (aligned with `matrix`: frame -> crop) into a copy of `frame` inside `soft_mask` (crop space)."""
    inverse = invert(matrix)
    bounds = mask_bounds(soft_mask, inverse, frame.shape[:2])
    out = frame.copy()
    if bounds is None:
        return out
    x0, y0, x1, y1 = bounds
    shift = inverse.copy()
    shift[:, 2] -= (x0, y0)
    size = (x1 - x0, y1 - y0)
    face = cv2.warpAffine(crop, shift, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    alpha = cv2.warpAffine(soft_mask, shift, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    region = out[y0:y1, x0:x1]
    a = alpha[..., None]
    blended = np.clip(region.astype(np.float32) * (1 - a) + face.astype(np.float32) * a + 0.5, 0, 255).astype(np.uint8)
    inside = alpha > 0
    region[inside] = blended[inside]
    return out

"""APPLE's conditional-deblurring corruption: inside the face mask, the image downsampled to 8x8 and back."""

from __future__ import annotations

import numpy as np
from PIL import Image

# CelebAMask-HQ classes that are blurred: skin, brows, eyes, glasses, ears, nose, mouth, lips
# (not earrings, neck, cloth, hair, hat, background), as in the official preprocessing.
BLUR_LABELS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13)


def downsample_blur(image: np.ndarray, size: int = 8) -> np.ndarray:
    """The whole image resized to size x size and back (LANCZOS both ways)."""
    h, w = image.shape[:2]
    small = Image.fromarray(image).resize((size, size), Image.LANCZOS)
    return np.asarray(small.resize((w, h), Image.LANCZOS))


def deblur_condition(image: np.ndarray, mask: np.ndarray, size: int = 8) -> np.ndarray:
    """`image` with its masked face region replaced by the 8x8 down/up version; everything else untouched."""
    inside = mask > 0
    out = image.copy()
    out[inside] = downsample_blur(image, size)[inside]
    return out


def mask_from_parsing(labels: np.ndarray) -> np.ndarray:
    return np.where(np.isin(labels, BLUR_LABELS), 255, 0).astype(np.uint8)

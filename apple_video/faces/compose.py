"""The mask of what a swap replaces, composed from --face-mask-types: region (face parsing, or the landmark hull
less the regions left out), box (the landmark hull) and occlusion (what covers the face is kept), intersected."""

from __future__ import annotations

import numpy as np

from apple_video.faces.mask import MASK_REGIONS, feather, hull_mask, oval_mask, pad_mask, parsing_mask
from apple_video.faces.occlusion import OcclusionMasker
from apple_video.faces.parsing import FaceParser
from apple_video.settings import SwapSettings


def mask_for(target_landmarks: np.ndarray | None, size: int, settings: SwapSettings, parser: FaceParser | None = None,
             crop: np.ndarray | None = None, occlusion: OcclusionMasker | None = None) -> np.ndarray:
    """Feathered mask of what to replace, in crop space, from --face-mask-types: region (parsing when a parser is
    given, else the landmark hull less the regions left out), box (the landmark hull), occlusion (what covers the
    face is left out); several are intersected."""
    types = settings.mask.types
    regions = settings.mask.regions if "region" in types else MASK_REGIONS
    if parser is not None and crop is not None and "region" in types:
        hard = parsing_mask(parser.labels(crop), regions)
        if "box" in types and target_landmarks is not None:
            hard = np.minimum(hard, hull_mask(target_landmarks, size))
    elif target_landmarks is not None:
        hard = hull_mask(target_landmarks, size, regions)
    else:
        hard = oval_mask(size)
    if occlusion is not None and crop is not None:
        hard = np.where(occlusion(crop) > 0.5, hard, 0).astype(np.uint8)
    return feather(pad_mask(hard, settings.mask.padding), settings.mask.blur)

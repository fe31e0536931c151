"""Face-region flicker: how much the face changes between consecutive frames beyond what the motion explains.

The motion comes from the ORIGINAL clip (OpenCV DIS optical flow on its face region, from frame t to t-1); both
clips' frame t-1 are warped by it onto frame t, and the mean absolute grey-level residual inside the face is the
flicker. The swapped clip's flicker over the original's is the ratio reported: 1 means the swap adds no
temporal instability, larger means it does.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

FLICKER_MODEL = "OpenCV DIS optical flow (fast preset) of the original clip's face region; grey-level warp residual"


@dataclass(frozen=True)
class FlickerSample:
    swapped: float  # mean |warped previous - current| of the swapped clip in the face, grey levels 0..255
    original: float  # the same for the original clip (its own noise, lighting change and flow error)


def face_box(boxes: list[np.ndarray], shape: tuple[int, int], pad: float = 0.15) -> tuple[int, int, int, int]:
    """The union of face boxes (x0, y0, x1, y1), padded and clipped to the frame."""
    stacked = np.stack(boxes)
    x0, y0 = stacked[:, :2].min(0)
    x1, y1 = stacked[:, 2:].max(0)
    px, py = pad * (x1 - x0), pad * (y1 - y0)
    h, w = shape
    return (int(max(0, x0 - px)), int(max(0, y0 - py)), int(min(w, x1 + px)), int(min(h, y1 + py)))


def _grey(rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.ascontiguousarray(cv2.cvtColor(np.ascontiguousarray(rgb[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY))


class FlickerMeter:
    """One DIS flow per pair of original frames; the face-region residual of both clips under that flow."""

    def __init__(self) -> None:
        self._flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST)

    def measure(self, original: tuple[np.ndarray, np.ndarray], swapped: tuple[np.ndarray, np.ndarray],
                box: tuple[int, int, int, int]) -> FlickerSample | None:
        """(previous, current) frames of each clip; `box` the face region in the current frame."""
        prev_o, cur_o = _grey(original[0], box), _grey(original[1], box)
        h, w = cur_o.shape
        if h < 16 or w < 16:
            return None
        flow = self._flow.calc(cur_o, prev_o, None)  # cur(x) ~ prev(x + flow(x))
        grid = np.mgrid[0:h, 0:w].astype(np.float32)
        map_x, map_y = grid[1] + flow[..., 0], grid[0] + flow[..., 1]
        inside = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
        oval = np.zeros((h, w), np.uint8)
        cv2.ellipse(oval, (w // 2, h // 2), (int(w * 0.42), int(h * 0.46)), 0, 0, 360, 1, -1)
        keep = inside & (oval > 0)
        if not keep.any():
            return None

        def residual(prev: np.ndarray, cur: np.ndarray) -> float:
            warped = cv2.remap(prev, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            return float(np.abs(warped.astype(np.float32) - cur.astype(np.float32))[keep].mean())

        return FlickerSample(residual(_grey(swapped[0], box), _grey(swapped[1], box)), residual(prev_o, cur_o))


def flicker_ratio(samples: list[FlickerSample]) -> float | None:
    """Mean swapped flicker over mean original flicker (None without samples)."""
    if not samples:
        return None
    original = float(np.mean([s.original for s in samples]))
    swapped = float(np.mean([s.swapped for s in samples]))
    return swapped / max(original, 1e-6)

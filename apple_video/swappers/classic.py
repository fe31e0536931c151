"""Classic landmark swap: Delaunay piecewise-affine warp of the source face onto the target's 68 landmarks,
LAB colour transfer, then the shared feathered paste-back. Works with no model weights at all."""

from __future__ import annotations

import cv2
import numpy as np
from scipy.spatial import Delaunay

from apple_video.errors import NoFaceError
from apple_video.faces.mask import hull_mask
from apple_video.faces.paste import color_transfer
from apple_video.swappers.base import CropJob, SourceFace, SwapSkipped


def extended_points(landmarks: np.ndarray) -> np.ndarray:
    """68 landmarks plus the brows lifted toward the forehead, so the warp covers the whole mask."""
    lm = np.asarray(landmarks, np.float64)
    lift = (lm[8] - lm[27]) * 0.25
    return np.concatenate([lm, lm[17:27] - lift])


def delaunay(points: np.ndarray) -> np.ndarray:
    """Triangles (as point-index triples) of the Delaunay triangulation of `points`."""
    return Delaunay(np.asarray(points, np.float64)).simplices.astype(np.int32)


def _signed_areas(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    a, b, c = points[triangles[:, 0]], points[triangles[:, 1]], points[triangles[:, 2]]
    return (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])


def warp_triangles(src: np.ndarray, src_pts: np.ndarray, dst_pts: np.ndarray, triangles: np.ndarray,
                   size: int) -> np.ndarray:
    """Piecewise-affine warp of `src` so that its points move onto `dst_pts`."""
    out = np.zeros((size, size, 3), np.float32)
    for tri in triangles:
        s = src_pts[tri].astype(np.float32)
        d = dst_pts[tri].astype(np.float32)
        x, y, w, h = cv2.boundingRect(d)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, size), min(y + h, size)
        if x1 <= x0 or y1 <= y0:
            continue
        matrix = cv2.getAffineTransform(s, d - np.float32([x0, y0]))
        patch = cv2.warpAffine(src, matrix, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
        tri_mask = np.zeros((y1 - y0, x1 - x0), np.float32)
        cv2.fillConvexPoly(tri_mask, np.round(d - np.float32([x0, y0])).astype(np.int32), 1.0)
        region = out[y0:y1, x0:x1]
        keep = tri_mask[..., None]
        region[:] = region * (1 - keep) + patch.astype(np.float32) * keep
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def poisson_blend(face: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Gradient-domain blend of `face` into `target` inside `mask` (OpenCV seamlessClone); plain copy if it can't."""
    inner = cv2.erode(mask, np.ones((3, 3), np.uint8))
    inner[:2], inner[-2:], inner[:, :2], inner[:, -2:] = 0, 0, 0, 0  # seamlessClone needs a margin
    x, y, w, h = cv2.boundingRect(inner)
    if w < 4 or h < 4:
        return target.copy()
    return cv2.seamlessClone(face, target, inner, (x + w // 2, y + h // 2), cv2.NORMAL_CLONE)


class ClassicSwapper:
    """The offline default swapper and evaluation baseline."""

    name = "classic"
    real = True

    def __init__(self, crop_size: int = 256, fold_tolerance: float = 0.1, poisson: bool = False) -> None:
        self.crop_size = crop_size
        self.fold_tolerance = fold_tolerance
        self.poisson = poisson
        self._source: SourceFace | None = None
        self._src_points: np.ndarray | None = None
        self._triangles: np.ndarray | None = None

    def auto_batch_size(self) -> int:
        return 4  # one crop at a time inside; the group size only sets how much decoding runs ahead

    def prepare(self, sources: list[SourceFace]) -> None:
        usable = [s for s in sources if s.landmarks is not None]
        if not usable:
            raise NoFaceError("the classic swapper needs 68 landmarks of the source face; none were found")
        self._source = usable[0]
        self._src_points = extended_points(self._source.landmarks)
        self._triangles = delaunay(self._src_points)

    def swap_one(self, job: CropJob) -> np.ndarray:
        if self._source is None or self._triangles is None:
            raise RuntimeError("prepare() must be called before swap()")
        if job.landmarks is None:
            raise SwapSkipped("no 68 landmarks for this face")
        dst_points = extended_points(job.landmarks)
        src_sign = np.sign(_signed_areas(self._src_points, self._triangles))
        dst_sign = np.sign(_signed_areas(dst_points, self._triangles))
        if np.mean(src_sign != dst_sign) > self.fold_tolerance:
            raise SwapSkipped("the warp would fold (extreme profile)")
        warped = warp_triangles(self._source.crop, self._src_points, dst_points, self._triangles, self.crop_size)
        mask = hull_mask(job.landmarks, self.crop_size)
        warped = color_transfer(warped, job.crop, mask)
        if self.poisson:
            return poisson_blend(warped, job.crop, mask)
        out = job.crop.copy()
        inside = mask > 0
        out[inside] = warped[inside]
        return out

    def swap(self, jobs: list[CropJob]) -> list[np.ndarray | None]:
        results: list[np.ndarray | None] = []
        for job in jobs:
            try:
                results.append(self.swap_one(job))
            except SwapSkipped:
                results.append(None)
        return results

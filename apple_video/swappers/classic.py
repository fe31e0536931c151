"""Classic landmark swap: Delaunay piecewise-affine warp of the source face onto the target's 68 landmarks, then a
two-band blend (the target's low frequencies, the source's detail) inside the inner face of both faces, with the
target's lips and mouth interior kept. Works with no model weights at all, and the same crop always gives the same output."""

from __future__ import annotations

import logging

import cv2
import numpy as np
from scipy.spatial import Delaunay

from apple_video.errors import NoFaceError
from apple_video.faces.align import alignment_matrix, similarity_from_points
from apple_video.faces.mask import face_height
from apple_video.swappers.base import CropJob, SourceFace, SwapSkipped
from apple_video.swappers.classic_masks import inner_face_mask, skin_mask, soft_edge

logger = logging.getLogger(__name__)


def extended_points(landmarks: np.ndarray) -> np.ndarray:
    """68 landmarks plus the brows lifted toward the forehead, so the warp covers the whole mask."""
    lm = np.asarray(landmarks, np.float64)
    return np.concatenate([lm, lm[17:27] - face_height(lm) * 0.25])


RIGID_POINTS = np.r_[17:48]  # brows, nose and eyes: the part of the face a talking head does not deform
ALIGN_POINTS = np.r_[27:48]  # nose and eyes: not moved by speech or by raised brows


def regularised_landmarks(target: np.ndarray, source: np.ndarray, keep: float) -> np.ndarray:
    """`target` with its brows, nose and eyes moved toward the source's shape fitted (affine, least squares) onto
    them; `keep` of the target's own residual stays. The source's eye and nose geometry is part of its identity,
    and the fit damps the per-point jitter of the detector a little (sharp source detail shows every wobble)."""
    target = np.asarray(target, np.float64)
    src = np.hstack([np.asarray(source, np.float64)[RIGID_POINTS], np.ones((len(RIGID_POINTS), 1))])
    affine, *_ = np.linalg.lstsq(src, target[RIGID_POINTS], rcond=None)
    fitted = src @ affine
    out = target.copy()
    out[RIGID_POINTS] = fitted + keep * (target[RIGID_POINTS] - fitted)
    return out


def delaunay(points: np.ndarray) -> np.ndarray:
    """Triangles (as point-index triples) of the Delaunay triangulation of `points`."""
    return Delaunay(np.asarray(points, np.float64)).simplices.astype(np.int32)


def _signed_areas(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    a, b, c = points[triangles[:, 0]], points[triangles[:, 1]], points[triangles[:, 2]]
    return (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])


def triangle_affines(src_pts: np.ndarray, dst_pts: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(T, 2, 3) affine maps taking each triangle of `dst_pts` onto the same triangle of `src_pts`, all solved at once."""
    dst = np.asarray(dst_pts, np.float64)[triangles]
    src = np.asarray(src_pts, np.float64)[triangles]
    corners = np.concatenate([dst, np.ones((len(triangles), 3, 1))], axis=2)  # rows (x, y, 1)
    affines = np.empty((len(triangles), 3, 2))
    solvable = np.abs(np.linalg.det(corners)) > 1e-9
    affines[solvable] = np.linalg.solve(corners[solvable], src[solvable])
    # a flat (zero-area) target triangle covers no pixel: any map through its corners will do
    affines[~solvable] = np.linalg.pinv(corners[~solvable]) @ src[~solvable]
    return affines.transpose(0, 2, 1)


def triangle_box_maps(src_pts: np.ndarray, dst_pts: np.ndarray, triangles: np.ndarray,
                      size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """Per-pixel source coordinates (map_x, map_y) of the piecewise-affine warp src -> dst, and the pixels covered,
    over the box the triangles cover; the box's (x, y) offset in the size x size output."""
    ids = np.zeros((size, size), np.uint8)  # triangle index + 1; fewer than 255 triangles for 78 points
    corners = np.round(np.asarray(dst_pts, np.float32)[triangles] * 16).astype(np.int32)
    for k, polygon in enumerate(corners):
        cv2.fillConvexPoly(ids, polygon, k + 1, lineType=cv2.LINE_8, shift=4)
    x, y, w, h = cv2.boundingRect(ids)
    ids = ids[y : y + h, x : x + w]
    table = np.zeros((len(triangles) + 1, 6), np.float32)
    table[0, [2, 5]] = -1.0  # no triangle: (-1, -1)
    table[1:] = triangle_affines(src_pts, dst_pts, triangles).reshape(-1, 6)
    coefficients = table[ids]
    xs = np.arange(x, x + w, dtype=np.float32)[None, :]
    ys = np.arange(y, y + h, dtype=np.float32)[:, None]
    map_x = coefficients[..., 0] * xs + coefficients[..., 1] * ys + coefficients[..., 2]
    map_y = coefficients[..., 3] * xs + coefficients[..., 4] * ys + coefficients[..., 5]
    return map_x, map_y, ids > 0, (x, y)


def triangle_maps(src_pts: np.ndarray, dst_pts: np.ndarray, triangles: np.ndarray,
                  size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel source coordinates (map_x, map_y) of the piecewise-affine warp src -> dst over the whole
    size x size output ((-1, -1) where no triangle covers it), and the pixels covered."""
    box_x, box_y, box_covered, (x, y) = triangle_box_maps(src_pts, dst_pts, triangles, size)
    map_x, map_y = np.full((size, size), -1.0, np.float32), np.full((size, size), -1.0, np.float32)
    covered = np.zeros((size, size), bool)
    h, w = box_covered.shape
    map_x[y : y + h, x : x + w], map_y[y : y + h, x : x + w], covered[y : y + h, x : x + w] = box_x, box_y, box_covered
    return map_x, map_y, covered


def warp_triangles(src: np.ndarray, src_pts: np.ndarray, dst_pts: np.ndarray, triangles: np.ndarray,
                   size: int) -> np.ndarray:
    """Piecewise-affine warp of `src` (any channel count) so that its points move onto `dst_pts`; float32, zero
    where no triangle covers the output."""
    map_x, map_y, covered, (x, y) = triangle_box_maps(src_pts, dst_pts, triangles, size)
    channels = 1 if src.ndim == 2 else src.shape[2]
    out = np.zeros((size, size, channels), np.float32)
    if covered.size:
        warped = cv2.remap(np.asarray(src, np.float32), map_x, map_y, cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT101).reshape(*covered.shape, channels)
        np.multiply(warped, covered[..., None], out=out[y : y + covered.shape[0], x : x + covered.shape[1]])
    return out


def _masked_blur(image: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of `image` counting only pixels where `weight` > 0 (normalised convolution). Done at a
    quarter of the size when the blur is wide: the result has no detail finer than that anyway."""
    h, w = weight.shape
    factor = 4 if sigma >= 8 and min(h, w) >= 64 else 1
    channels = 1 if image.ndim == 2 else image.shape[2]
    image = image.reshape(h, w, channels)
    if factor == 1:
        blurred = cv2.GaussianBlur(np.dstack([image * weight[..., None], weight]), (0, 0), sigma)
        return blurred[..., :channels] / np.maximum(blurred[..., channels:], np.float32(1e-4))
    # shrunk channel by channel (OpenCV's 1- and 3-channel paths), then blurred and normalised at the small size
    small = (w // factor, h // factor)
    product = cv2.multiply(image, cv2.merge([weight] * channels)) if channels > 1 else image[..., 0] * weight
    parts = cv2.resize(product, small, interpolation=cv2.INTER_AREA).reshape(small[1], small[0], channels)
    total = cv2.resize(weight, small, interpolation=cv2.INTER_AREA)
    blurred = cv2.GaussianBlur(np.dstack([parts, total]), (0, 0), sigma / factor)
    normalised = blurred[..., :channels] / np.maximum(blurred[..., channels:], np.float32(1e-4))
    return cv2.resize(normalised, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, channels)


def fill_outside(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`image` (float32) with the pixels outside `mask` replaced by a wide blur of those inside: nothing outside
    the mask (a source's backdrop, hat or hair) can reach the output through interpolation or detail filters."""
    inside = (mask > 0).astype(np.float32)
    image = image.astype(np.float32)
    filled = _masked_blur(image, inside, max(image.shape[:2]) / 16)
    return np.where(inside[..., None] > 0, image, filled).astype(np.float32)


def _masked_std(image: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Per-channel standard deviation of `image` over the pixels where `inside` (uint8) is non-zero."""
    return cv2.meanStdDev(image, mask=inside)[1].ravel()


def match_fine_detail(face: np.ndarray, target: np.ndarray, inside: np.ndarray, sigma: float) -> np.ndarray:
    """`face` (one channel) with its detail finer than `sigma` scaled down to the target's amount inside `inside`
    (uint8, non-zero inside; never up): a crisp source on a soft target looks pasted, and its sharp edges (glasses
    rims, wrinkles) show every sub-pixel wobble of the warp as flicker."""
    fine_face = face - cv2.GaussianBlur(face, (0, 0), sigma)
    fine_target = target - cv2.GaussianBlur(target, (0, 0), sigma)
    ratio = float(np.clip((_masked_std(fine_target, inside)[0] + 1e-3) / (_masked_std(fine_face, inside)[0] + 1e-3),
                          0.3, 1.0))
    return face - np.float32(1.0 - ratio) * fine_face


def match_low_band(face: np.ndarray, target: np.ndarray, region: np.ndarray, sigma: float,
                   fine: float = 3.0) -> np.ndarray:
    """`face` (float RGB) recoloured to `target` inside `region`, in Lab: contrast matched per channel (ratio of
    standard deviations, clamped), then the low frequencies (below `sigma`) replaced by the target's, and the detail
    finer than `fine` pixels no sharper than the target's.

    Colour thus comes from the target alone, which makes grey and differently lit sources fit and keeps the
    colour as steady as the target's own; only the detail is the source's."""
    inside = (region > 0).astype(np.uint8)
    if cv2.countNonZero(inside) < 16:
        return face
    weight = inside.astype(np.float32)
    face_lab = cv2.cvtColor(np.clip(face, 0, 255, dtype=np.float32) * np.float32(1 / 255), cv2.COLOR_RGB2LAB)
    target_lab = cv2.cvtColor(target.astype(np.float32) * np.float32(1 / 255), cv2.COLOR_RGB2LAB)
    gain = np.clip((_masked_std(target_lab, inside) + 1.0) / (_masked_std(face_lab, inside) + 1.0), 0.5, 2.0)
    face_lab = cv2.transform(face_lab, np.diag(gain).astype(np.float32))  # per-channel gain (10x numpy's broadcast)
    face_lab += _masked_blur(target_lab, weight, sigma) - _masked_blur(face_lab, weight, sigma)
    channels = list(cv2.split(face_lab))
    channels[0] = match_fine_detail(channels[0], cv2.extractChannel(target_lab, 0), inside, fine)
    return cv2.cvtColor(cv2.merge(channels), cv2.COLOR_LAB2RGB) * np.float32(255)


def far_side_weight(source: np.ndarray, target: np.ndarray, size: int, turned: float = 0.85,
                    profile: float = 0.5) -> np.ndarray:
    """Float (size, size) weight of the source per crop pixel: 1 on a face turned like the source, and on a turned
    target less and less of the source from its far eye out to its far jaw line, down to none there once the far
    half of the face (nose line to jaw, over the whole jaw width) is `profile` of the source's. A frontal source
    would be crushed against the silhouette there; the target keeps its own skin and shading instead."""
    weight = np.ones((size, size), np.float32)
    src, dst = np.asarray(source, np.float64), np.asarray(target, np.float64)

    def half(lm: np.ndarray, jaw: slice) -> float:
        return float(np.abs(lm[jaw, 0] - lm[27:31, 0].mean()).mean() / max(np.ptp(lm[0:17, 0]), 1e-6))

    xs = np.arange(size, dtype=np.float32)[None, :]
    for jaw, eye in ((slice(0, 8), slice(36, 42)), (slice(9, 17), slice(42, 48))):
        ratio = half(dst, jaw) / max(half(src, jaw), 1e-6)
        keep = float(np.clip((ratio - profile) / (turned - profile), 0.0, 1.0))
        if keep >= 1.0:
            continue
        eye_x, jaw_x = dst[eye, 0].mean(), dst[jaw, 0].mean() + (dst[jaw, 0].mean() - dst[eye, 0].mean()) * 0.5
        ramp = np.clip((xs - eye_x) / (jaw_x - eye_x), 0.0, 1.0)  # 0 at the far eye, 1 past the jaw line
        weight = np.minimum(weight, np.broadcast_to(1.0 - (1.0 - keep) * ramp, (size, size)))
    return np.ascontiguousarray(weight)


def band_blend(face: np.ndarray, target: np.ndarray, region: np.ndarray, sigma: float, edge: int,
               weight: np.ndarray | None = None) -> np.ndarray:
    """Two-band blend of `face` into `target` inside `region` (0/255): low band from the target, detail from the
    face, faded in over `edge` pixels inside the region so neither a colour band nor a hard seam shows; `weight`
    (0..1 per pixel) fades the face out further."""
    matched = match_low_band(face, target, region, sigma)
    alpha = soft_edge(region, edge)
    alpha = (alpha if weight is None else alpha * weight)[..., None]
    out = target.astype(np.float32) * (1.0 - alpha) + matched * alpha
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
    """The offline default swapper and evaluation baseline.

    Per crop: warp the source face onto the target's (track-smoothed) landmarks, keep only the inner face of both
    faces (the source's forehead only where it is skin), keep the target's lips and mouth interior, and blend in two bands.
    No state is carried between crops, so chunking and workers never change a frame's result."""

    name = "classic"
    real = True
    per_crop = True  # each crop on its own: a batch's size never changes a result (no padding to full batches)

    def __init__(self, crop_size: int = 256, fold_tolerance: float = 0.1, poisson: bool = False,
                 low_band: float = 0.1, keep_shape: float = 0.0) -> None:
        self.crop_size = crop_size
        self.keep_shape = keep_shape  # how much of the target's own brow/eye/nose shape the warp follows
        self.low_band = low_band  # the colour band's Gaussian sigma, as a fraction of the crop size
        self.fold_tolerance = fold_tolerance
        self.poisson = poisson
        self._source: SourceFace | None = None
        self._src_points: np.ndarray | None = None
        self._triangles: np.ndarray | None = None
        self._src_layers: np.ndarray | None = None  # (S, S, 4) float32: RGB and the source's usable-face mask

    def crop_matrix(self, kps: np.ndarray, landmarks: np.ndarray | None) -> np.ndarray:
        """Frame -> crop transform fitted on the eyes and nose (21 points) onto the source's: the FFHQ alignment
        follows the mouth corners, so it would shift the whole face by a pixel or so as the mouth moves."""
        if landmarks is None or self._source is None:
            return alignment_matrix(kps, self.crop_size)
        return similarity_from_points(np.asarray(landmarks, np.float64)[ALIGN_POINTS],
                                      self._source.landmarks[ALIGN_POINTS])

    def auto_batch_size(self) -> int:
        return 4  # one crop at a time inside; the group size only sets how much decoding runs ahead

    def prepare(self, sources: list[SourceFace]) -> None:
        usable = [s for s in sources if s.landmarks is not None]
        if not usable:
            raise NoFaceError("the classic swapper needs 68 landmarks of the source face; none were found")
        self._source = usable[0]
        if len(sources) > 1:
            logger.info("classic swapper: uses one source photo, number %d of %d (the first with 68 landmarks); the "
                        "others are not used", sources.index(self._source) + 1, len(sources))
        self._src_points = extended_points(self._source.landmarks)
        self._triangles = delaunay(self._src_points)
        crop = np.ascontiguousarray(self._source.crop[..., :3])  # antialiased by warp_crop when it shrinks
        usable_face = self._source_mask(crop, self._source.landmarks)
        self._src_layers = np.dstack([fill_outside(crop, usable_face), usable_face.astype(np.float32)])

    def _source_mask(self, crop: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """The source's inner face; above the brows and at the sides only skin-coloured pixels (no hat, hair)."""
        size = crop.shape[0]
        inner = inner_face_mask(landmarks, size)
        core = np.zeros_like(inner)
        core_points = np.asarray(landmarks, np.float64)[17:68]
        cv2.fillPoly(core, [np.round(cv2.convexHull(core_points.astype(np.float32))).astype(np.int32)], 255)
        usable = cv2.bitwise_and(inner, cv2.bitwise_or(core, skin_mask(crop, landmarks)))
        # keep the largest piece only: stray skin-coloured specks in the hair are not face
        count, labels, stats, _ = cv2.connectedComponentsWithStats(usable)
        if count > 2:
            usable = np.where(labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])), 255, 0).astype(np.uint8)
        # shrunk by a pixel at its silhouette: the crop's own resampling blends the pixels along it with the backdrop
        return cv2.erode(usable, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))

    def blend_region(self, landmarks: np.ndarray, warped_source_mask: np.ndarray) -> np.ndarray:
        """Where the source replaces the target (0/255): inner face of both faces, minus the target's lips, mouth
        and chin (grown a little): the target's moving mouth stays its own, with no source lip edge sliding over it."""
        size = self.crop_size
        region = inner_face_mask(landmarks, size)
        region[warped_source_mask < 127.5] = 0
        pts = np.asarray(landmarks, np.float32)
        kept = np.zeros_like(region)
        cv2.fillPoly(kept, [np.round(cv2.convexHull(pts[48:60])).astype(np.int32)], 255)
        # the chin (jaw line up to the lower lip) moves with every word: stretching the source's texture over it
        # flickers, and the target's own chin carries little identity
        cv2.fillPoly(kept, [np.round(np.concatenate([pts[4:13], pts[[54, 55, 56, 57, 58, 59, 48]]])).astype(np.int32)], 255)
        grow = max(1, size // 128)
        region[cv2.dilate(kept, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))) > 0] = 0
        return region

    def swap_one(self, job: CropJob) -> np.ndarray:
        if self._source is None or self._triangles is None or self._src_layers is None:
            raise RuntimeError("prepare() must be called before swap()")
        if job.landmarks is None:
            raise SwapSkipped("no 68 landmarks for this face")
        dst_points = self.target_points(job.landmarks)
        layers = self.warp(dst_points)
        region, weight = self.masks(job.landmarks, layers[..., 3])
        return self.blend(layers[..., :3], np.ascontiguousarray(job.crop[..., :3]), region, weight)

    def target_points(self, landmarks: np.ndarray) -> np.ndarray:
        """Where the source's warp points land on this target; skips a warp that would fold."""
        dst_points = extended_points(regularised_landmarks(landmarks, self._source.landmarks, self.keep_shape))
        src_sign = np.sign(_signed_areas(self._src_points, self._triangles))
        dst_sign = np.sign(_signed_areas(dst_points, self._triangles))
        if np.mean(src_sign != dst_sign) > self.fold_tolerance:
            raise SwapSkipped("the warp would fold (extreme profile)")
        return dst_points

    def warp(self, dst_points: np.ndarray) -> np.ndarray:
        """The source's RGB and usable-face layers warped onto `dst_points` (S, S, 4) float32."""
        return warp_triangles(self._src_layers, self._src_points, dst_points, self._triangles, self.crop_size)

    def masks(self, landmarks: np.ndarray, warped_source_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The blend region (0/255) and the far-side weight (0..1) of this target."""
        region = self.blend_region(landmarks, warped_source_mask)
        return region, far_side_weight(self._source.landmarks, landmarks, self.crop_size)

    def blend(self, face: np.ndarray, target: np.ndarray, region: np.ndarray, weight: np.ndarray) -> np.ndarray:
        sigma = self.crop_size * self.low_band
        if self.poisson:
            region[weight < 0.5] = 0
            face = np.clip(match_low_band(face, target, region, sigma) + 0.5, 0, 255).astype(np.uint8)
            return poisson_blend(face, target, region)
        return band_blend(face, target, region, sigma, edge=max(2, self.crop_size // 32), weight=weight)

    def swap(self, jobs: list[CropJob]) -> list[np.ndarray | None]:
        results: list[np.ndarray | None] = []
        for job in jobs:
            try:
                results.append(self.swap_one(job))
            except SwapSkipped:
                results.append(None)
        return results

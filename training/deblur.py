"""APPLE's teacher condition (`blur_landmark_iris`): the face region downsampled to 8x8 and back, the face
landmarks drawn in white and the irises in red on top, glasses tinted magenta; the background untouched.

One builder for training, pseudo-labels and teacher inference. Drawing rules as in the official preprocessing:
landmarks as `cv2.circle(radius r, thickness 2r)` with r = max(int(size / 200), 1) at integer-truncated
coordinates (3DDFA-V3's `plot_kpts`); iris points as filled PIL ellipses of radius 2 at 512 (MediaPipe Iris
script) at rounded coordinates; glasses pixels `addWeighted(condition, 0.9, magenta, 0.1)`. Official landmarks
are 3DDFA-V3's 68 points and MediaPipe's 5 iris points per eye; here the 68 come from dlib and the iris points
are MediaPipe's iris model on dlib's eye contours (`training.iris`) or, without it, estimated from the eye
contour (`irises_from_eyes`).
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageDraw

from apple_video.faces.mask import hull_mask

IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), np.float32)
# CelebAMask-HQ classes that are blurred: skin, brows, eyes, glasses, ears, nose, mouth, lips
# (not earrings, neck, cloth, hair, hat, background), as in the official preprocessing.
BLUR_LABELS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13)
GLASSES_LABEL = 6
LANDMARK_COLOUR = (255, 255, 255)
IRIS_COLOUR = (255, 0, 0)
GLASSES_COLOUR = (255, 0, 255)
HULL_REGIONS = ("skin", "left-eyebrow", "right-eyebrow", "left-eye", "right-eye", "glasses", "nose", "mouth",
                "upper-lip", "lower-lip")
# Iris radius over eye width (corner to corner): ~11.7 mm of iris over ~30 mm of palpebral fissure.
IRIS_RADIUS_PER_EYE_WIDTH = 0.195
EYES_68 = ((36, 37, 38, 39, 40, 41), (42, 43, 44, 45, 46, 47))  # image-left eye, image-right eye; corners 1st, 4th


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


def hull_labels(landmarks: np.ndarray, size: int) -> np.ndarray:
    """A stand-in parsing map when no parsing weights exist: skin (1) inside the landmark hull, background (0) outside."""
    return np.where(hull_mask(landmarks, size, HULL_REGIONS) > 0, 1, 0).astype(np.uint8)


def landmark_radius(size: int) -> int:
    return max(int(size / 200), 1)


def iris_radius(size: int) -> int:
    """2 px at 512 as in the official iris drawing, scaled with the crop."""
    return max(round(2 * size / 512), 1)


def landmark_pixels(landmarks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    radius = landmark_radius(min(shape))
    for x, y in np.asarray(landmarks, np.float64):
        cv2.circle(canvas, (int(x), int(y)), radius, 255, radius * 2)
    return canvas > 0


def iris_pixels(irises: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    r = iris_radius(min(shape))
    for x, y in np.rint(np.asarray(irises, np.float64)).astype(int):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return np.asarray(canvas) > 0


def irises_from_eyes(landmarks: np.ndarray) -> np.ndarray:
    """MediaPipe-style iris points (centre + 4 on the rim along and across the eye axis), 5 per eye, estimated
    from the 68-point eye contours: centre = contour mean, radius from the eye width. Gaze is not recovered."""
    lm = np.asarray(landmarks, np.float64)
    if len(lm) != 68:
        raise ValueError(f"irises from eye landmarks need the 68-point layout, got {len(lm)} points")
    points = []
    for eye in EYES_68:
        contour = lm[list(eye)]
        centre = contour.mean(0)
        axis = contour[3] - contour[0]
        width = float(np.linalg.norm(axis))
        along = axis / max(width, 1e-6)
        across = np.array([-along[1], along[0]])
        r = IRIS_RADIUS_PER_EYE_WIDTH * width
        points += [centre, centre + r * along, centre - r * across, centre - r * along, centre + r * across]
    return np.stack(points)


def face_region(labels: np.ndarray | None, landmarks: np.ndarray, size: int) -> np.ndarray:
    """The blurred region: parsing classes BLUR_LABELS, or the landmark hull without a parsing map."""
    source = labels if labels is not None else hull_labels(landmarks, size)
    return np.isin(source, BLUR_LABELS)


def blur_region(labels: np.ndarray, visible: np.ndarray | None = None) -> np.ndarray:
    """The official preprocessing's blur region: parsing classes BLUR_LABELS, intersected with the occlusion
    model's visible-face mask (H, W), nonzero = face not occluded, when one is given."""
    region = np.isin(labels, BLUR_LABELS)
    if visible is not None:
        if visible.shape != labels.shape:
            raise ValueError(f"occlusion mask {visible.shape} does not match the parsing map {labels.shape}")
        region &= np.asarray(visible) > 0
    return region


def parse_official(parser, crop: np.ndarray) -> np.ndarray:
    """CelebAMask-HQ labels of a crop as the official preprocessing computes them: the crop (at its own size, 512
    in the official data) ImageNet-normalised and then normalised again by (x - 0.5) / 0.5 (SimSwap's SpecificNorm)
    before BiSeNet. `parser`: a `FaceParser` (its network and device)."""
    import torch

    x = crop.astype(np.float32) / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    x = (x - 0.5) / 0.5
    tensor = torch.from_numpy(x).permute(2, 0, 1)[None].float().to(parser.device)
    with torch.no_grad():
        return parser.model(tensor)[0].argmax(1)[0].cpu().numpy().astype(np.uint8)


def teacher_condition(image: np.ndarray, landmarks: np.ndarray, labels: np.ndarray | None = None,
                      irises: np.ndarray | None = None, downsample: int = 8, region: np.ndarray | None = None) -> np.ndarray:
    """The `blur_landmark_iris` condition of an aligned crop (H, W, 3) uint8.

    `labels`: CelebAMask-HQ parsing of the crop (None: the landmark hull, no glasses); `irises`: (K, 2) iris
    points in crop space (None: estimated from the 68 eye landmarks); `region`: the blur region when it was
    computed beforehand (`blur_region` with an occlusion mask), else from the labels."""
    shape = image.shape[:2]
    mask = region if region is not None else face_region(labels, landmarks, min(shape))
    out = deblur_condition(image, mask, downsample)
    out[landmark_pixels(landmarks, shape)] = LANDMARK_COLOUR
    out[iris_pixels(irises if irises is not None else irises_from_eyes(landmarks), shape)] = IRIS_COLOUR
    if labels is not None:
        glasses = labels == GLASSES_LABEL
        if region is not None:  # as the official: only where the face is visible (parsing ∩ occlusion mask)
            glasses &= region
        if glasses.any():
            tint = np.zeros_like(out)
            tint[glasses] = GLASSES_COLOUR
            out[glasses] = cv2.addWeighted(out, 0.9, tint, 0.1, 0)[glasses]
    return out

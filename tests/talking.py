"""Generated test faces for issue 25: talking clips of different face sizes, speech and head motion, and turned
faces, all made by warping package photos (no media is committed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from apple_video.swappers.classic import delaunay, triangle_maps
from tests import synth


def turned(photo: np.ndarray, landmarks: np.ndarray, degrees: float) -> np.ndarray:
    """The photo's head turned about a vertical axis by `degrees` (the face as a cylinder round the nose line): its
    far side is foreshortened, its near side widened. Outside the cylinder the shift fades out smoothly."""
    h, w = photo.shape[:2]
    lm = np.asarray(landmarks, np.float64)
    centre, radius = lm[27:36, 0].mean(), np.ptp(lm[0:17, 0]) * 0.62
    xs = np.arange(w, dtype=np.float64)
    u = np.clip((xs - centre) / radius, -1.0, 1.0)
    inside = centre + radius * np.sin(np.arcsin(u) - np.deg2rad(degrees))
    edge_shift = radius * (np.sin(np.sign(u) * np.pi / 2 - np.deg2rad(degrees)) - np.sign(u))
    beyond = np.maximum(np.abs(xs - centre) - radius, 0.0)
    src = np.where(np.abs(xs - centre) <= radius, inside, xs + edge_shift * np.exp(-((beyond / radius) ** 2) * 4))
    map_x = np.repeat(src[None].astype(np.float32), h, 0)
    map_y = np.repeat(np.arange(h, dtype=np.float32)[:, None], w, 1)
    return cv2.remap(photo, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def on_backdrop(photo: np.ndarray, landmarks: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """The photo with everything but the face painted `colour` right up to its silhouette (the jaw line and the
    forehead above the brows): the worst case of a backdrop showing beside the cheeks."""
    lm = np.asarray(landmarks, np.float64)
    lift = (lm[30] - lm[27]) * 3.0 * 0.5
    outline = np.concatenate([lm[0:17], (lm[17:27] - lift)[::-1]])
    face = np.zeros(photo.shape[:2], np.uint8)
    cv2.fillPoly(face, [np.round(cv2.convexHull(outline.astype(np.float32))).astype(np.int32)], 255)
    out = photo.copy()
    out[face == 0] = colour
    return out


@dataclass(frozen=True)
class Talk:
    """One generated talking clip: a face of `scale` moving along a path, its jaw opening with a speech rhythm."""

    name: str
    scale: float  # face patch scale in the frame
    size: tuple[int, int]  # frame width, height
    open_px: float  # jaw opening at full speech, in patch pixels
    syllable: float  # frames per syllable (speech rate)
    sway: float  # head motion amplitude, pixels
    nod: float  # head tilt amplitude, degrees
    seed: int


TALKS = (
    Talk("small-fast-still", 0.9, (480, 360), 7.0, 5.0, 2.0, 0.0, 1),
    Talk("medium-slow-swaying", 1.5, (640, 480), 10.0, 9.0, 14.0, 2.0, 2),
    Talk("large-irregular-nodding", 2.4, (960, 540), 12.0, 6.5, 8.0, 4.0, 3),
)


@dataclass(frozen=True)
class JawRig:
    """A face photo's control points for opening its jaw: the 68 landmarks and the border (kept still), their
    triangles, and how far each point follows the jaw down (lower lip and chin 1, mouth corners 0.6)."""

    points: np.ndarray
    triangles: np.ndarray
    weight: np.ndarray


def jaw_rig(landmarks: np.ndarray, w: int, h: int) -> JawRig:
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1], [w / 2, 0], [w / 2, h - 1], [0, h / 2],
                        [w - 1, h / 2]])
    points = np.concatenate([np.asarray(landmarks, np.float64), corners])
    weight = np.zeros(len(points))
    weight[[56, 57, 58, 65, 66, 67]] = 1.0
    weight[[55, 59]] = 0.6
    weight[5:12] = [0.4, 0.7, 0.9, 1.0, 0.9, 0.7, 0.4]
    return JawRig(points, delaunay(points), weight)


def open_jaw(image: np.ndarray, rig: JawRig, open_px: float, amount: float) -> np.ndarray:
    """`image` with its jaw and lower lip pulled down by `open_px * amount` (piecewise-affine warp)."""
    h, w = image.shape[:2]
    moved = rig.points.copy()
    moved[:, 1] += rig.weight * open_px * amount
    map_x, map_y, _ = triangle_maps(rig.points, moved, rig.triangles, max(w, h))
    return cv2.remap(image, map_x[:h, :w], map_y[:h, :w], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)


def talking_frames(patch: np.ndarray, landmarks: np.ndarray, talk: Talk, count: int = 36) -> list[np.ndarray]:
    """Frames of `talk`: the patch's jaw and lower lip pulled down by a speech envelope (syllables of uneven
    strength), the head swaying and nodding, over a textured background."""
    rng = np.random.default_rng(talk.seed)
    h, w = patch.shape[:2]
    rig = jaw_rig(landmarks, w, h)
    strength = rng.uniform(0.4, 1.0, count)
    background = synth.background(*talk.size, seed=talk.seed)
    frames = []
    for t in range(count):
        speech = strength[int(t // talk.syllable) % count] * 0.5 * (1 - np.cos(2 * np.pi * t / talk.syllable))
        face = open_jaw(patch, rig, talk.open_px, speech)
        if talk.nod:
            tilt = cv2.getRotationMatrix2D((w / 2, h / 2), talk.nod * np.sin(2 * np.pi * t / 30), 1.0)
            face = cv2.warpAffine(face, tilt, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
        cx = talk.size[0] / 2 + talk.sway * np.sin(2 * np.pi * t / 40)
        cy = talk.size[1] / 2 + talk.sway * 0.4 * np.sin(2 * np.pi * t / 27)
        frames.append(synth.paste_patch(background, face, synth.Placement(cx, cy, talk.scale)))
    return frames


def write_talk(folder: Path, patch: np.ndarray, landmarks: np.ndarray, talk: Talk, count: int = 36) -> Path:
    return synth.write_clip(folder / f"{talk.name}.mp4", talking_frames(patch, landmarks, talk, count), fps=15)

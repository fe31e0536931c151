"""Held-out talking clips for issue 36: faces the classic swapper was never tuned on (the packaged photos mirrored,
re-coloured, re-shaped; Grace Hopper as the target, the astronaut as the source), sizes 60-250 px, sway, nods,
speech, sensor noise, a lighting change and a cut. Seeds 101+ (the tuning clips in talking.py use 1-3); nothing in
the swapper was adjusted on these clips' outputs beyond checking the bound."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from apple_video.swappers.classic import delaunay, triangle_maps
from tests import synth, talking


@dataclass(frozen=True)
class HeldOut:
    """One held-out clip: which face (and how it is altered), how it talks and moves, and what happens to the shot."""

    name: str
    photo: str  # "astronaut" or "hopper": the target face's photo (the other one is the source)
    mirror: bool
    lab_shift: tuple[float, float, float]  # added to the face's L, a, b (OpenCV 8-bit Lab units)
    jaw: float  # the jaw line's width relative to the photo's (1: unchanged)
    talk: talking.Talk  # scale, frame size, speech, sway, nod, seed
    noise: float  # sensor noise sigma, grey levels, new every frame
    light: float  # the scene's brightness at the end of the clip relative to its start (1: no change)
    cut: int | None = None  # the frame where a second shot of the same face starts


HELD_OUT = (
    HeldOut("tiny-mirrored-noisy", "astronaut", True, (0, 0, 0), 1.0,
            talking.Talk("a", 0.7, (320, 240), 6.0, 4.0, 3.0, 0.0, 101), 4.0, 1.0),
    HeldOut("small-darker-relit", "astronaut", False, (-25, 6, 10), 1.0,
            talking.Talk("b", 1.15, (480, 360), 9.0, 6.0, 12.0, 3.0, 102), 1.5, 0.7),
    HeldOut("hopper-medium-nodding", "hopper", False, (0, 0, 0), 1.0,
            talking.Talk("c", 0.6, (640, 480), 14.0, 8.0, 6.0, 5.0, 103), 1.0, 1.0),
    HeldOut("wide-jaw-cut", "astronaut", False, (0, 0, 0), 1.15,
            talking.Talk("d", 1.6, (640, 480), 10.0, 5.5, 8.0, 2.0, 104), 0.0, 1.0, cut=18),
    HeldOut("large-hopper-mirrored-swaying", "hopper", True, (8, 4, -6), 1.0,
            talking.Talk("e", 1.1, (960, 540), 16.0, 7.0, 14.0, 2.0, 105), 2.0, 1.0),
    HeldOut("issue-100px-sway-speech-noise", "astronaut", False, (0, 0, 0), 1.1,
            talking.Talk("f", 1.1, (640, 360), 9.0, 5.0, 12.0, 1.5, 106), 2.0, 1.0),
)


def altered_face(patch: np.ndarray, landmarks: np.ndarray, case: HeldOut) -> np.ndarray:
    """`patch` mirrored, its jaw widened or narrowed about the nose line, its colour shifted in Lab."""
    h, w = patch.shape[:2]
    lm = np.asarray(landmarks, np.float64)
    if case.jaw != 1.0:
        corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1], [w / 2, 0], [w / 2, h - 1], [0, h / 2],
                            [w - 1, h / 2]])
        points = np.concatenate([lm, corners])
        moved = points.copy()
        centre = lm[27:31, 0].mean()
        moved[0:17, 0] = centre + (lm[0:17, 0] - centre) * case.jaw
        map_x, map_y, _ = triangle_maps(moved, points, delaunay(moved), max(w, h))
        patch = cv2.remap(patch, map_x[:h, :w], map_y[:h, :w], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    if any(case.lab_shift):
        lab = cv2.cvtColor(patch, cv2.COLOR_RGB2LAB).astype(np.float32) + np.float32(case.lab_shift)
        patch = cv2.cvtColor(np.clip(lab, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)
    return np.ascontiguousarray(patch[:, ::-1]) if case.mirror else patch


def held_out_frames(patch: np.ndarray, detector, case: HeldOut, count: int = 32) -> list[np.ndarray]:
    """The clip's frames: the altered face talking (talking.talking_frames), a second shot from `cut` on (another
    place, size and background), the light dimming linearly to `light`, fresh sensor noise on every frame."""
    rng = np.random.default_rng(case.talk.seed)
    first = altered_face(patch, detector.detect(patch)[0].landmarks, case)
    landmarks = detector.detect(first)[0].landmarks
    frames = talking.talking_frames(first, landmarks, case.talk, count)
    if case.cut is not None:
        width, height = case.talk.size
        second = talking.Talk(case.talk.name, case.talk.scale * 0.8, case.talk.size, case.talk.open_px,
                              case.talk.syllable, case.talk.sway, case.talk.nod, case.talk.seed + 50)
        shot = talking.talking_frames(first, landmarks, second, count)
        shift = np.float32([[1, 0, width * 0.22], [0, 1, -height * 0.08]])
        frames[case.cut:] = [cv2.warpAffine(f, shift, (width, height), borderMode=cv2.BORDER_REFLECT101)
                             for f in shot[case.cut:]]
    out = []
    for t, frame in enumerate(frames):
        gain = 1.0 + (case.light - 1.0) * t / max(count - 1, 1)
        noisy = frame.astype(np.float32) * gain + rng.normal(0, case.noise, frame.shape).astype(np.float32)
        out.append(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))
    return out


def write_held_out(folder: Path, patch: np.ndarray, detector, case: HeldOut, count: int = 32) -> Path:
    return synth.write_clip(folder / f"{case.name}.mp4", held_out_frames(patch, detector, case, count), fps=15)

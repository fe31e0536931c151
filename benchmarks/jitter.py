"""Landmark jitter of raw detections vs the smoothed track, on a clip where a real face follows a known smooth
path (plus camera noise). Jitter = mean |second difference| of the landmark error over frames; lag = the
frame shift that best aligns the smoothed track with the truth. Prints `jitter reduction: NN%`."""

from __future__ import annotations

import numpy as np
import skimage.data

from apple_video.faces.align import kps_from_68
from apple_video.faces.detect import DetectorSettings, create_detector
from apple_video.faces.track import TrackSettings, smooth_track
from apple_video.faces.types import Track
from tests import synth


def main(frames: int = 90, fps: float = 15.0, noise: float = 8.0) -> None:
    detector = create_detector(DetectorSettings(name="dlib"))
    patch = synth.face_patch(skimage.data.astronaut(), synth.ASTRONAUT_FACE_BOX)
    plan = synth.smooth_path(frames, 480, 360, patch.shape[1])
    rng = np.random.default_rng(1)
    clip = [np.clip(f + rng.normal(0, noise, f.shape), 0, 255).astype(np.uint8)
            for f in synth.face_frames(patch, (480, 360), plan)]
    patch_kps = kps_from_68(detector.detect(patch)[0].landmarks)
    h, w = patch.shape[:2]
    truth = np.stack([patch_kps * p.scale + (p.cx - p.scale * w / 2, p.cy - p.scale * h / 2) for p in plan])
    faces = [detector.detect(frame, embed=False)[0] for frame in clip]
    raw = np.stack([f.kps for f in faces])
    _, smoothed, _ = smooth_track(Track(0, list(range(frames)), faces), fps, TrackSettings())
    smoothed = np.stack([kps_from_68(p) for p in smoothed])

    def jitter(points: np.ndarray) -> float:
        return float(np.abs(np.diff(points - truth, n=2, axis=0)).mean())

    errors = {s: float(np.abs(smoothed[5 + s : frames - 5 + s] - truth[5 : frames - 5]).mean()) for s in range(-2, 3)}
    lag = min(errors, key=errors.get)
    print(f"frames {frames} @ {fps:g} fps, camera noise sigma {noise:g}")
    print(f"raw jitter {jitter(raw):.3f} px, smoothed {jitter(smoothed):.3f} px; "
          f"mean error raw {np.abs(raw - truth).mean():.2f} px, smoothed {np.abs(smoothed - truth).mean():.2f} px")
    print(f"best-aligned lag: {lag} frames")
    print(f"jitter reduction: {100 * (1 - jitter(smoothed) / jitter(raw)):.0f}%")


if __name__ == "__main__":
    main()

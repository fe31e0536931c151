"""Link detections into tracks (IoU + identity), fill short gaps, and smooth landmarks without lag."""

from __future__ import annotations

import math

import numpy as np

from apple_video.faces.types import Face, Track
from apple_video.settings import TrackSettings


def frame_signature(rgb: np.ndarray) -> np.ndarray:
    """A 16x16 grey thumbnail: cheap to store per frame, enough to see a cut."""
    h, w = rgb.shape[:2]
    ys = (np.arange(16) * h // 16)[:, None]
    xs = (np.arange(16) * w // 16)[None, :]
    picked = rgb[ys, xs]  # the grey of the sampled pixels only (a whole frame's would cost ~10 ms)
    return (picked.mean(axis=2) if rgb.ndim == 3 else picked).astype(np.float32)


def find_cuts(signatures: list[np.ndarray | None], threshold: float) -> set[int]:
    """Frames that start a new shot: the thumbnail changed by more than `threshold` grey levels on average."""
    cuts = set()
    for i in range(1, len(signatures)):
        a, b = signatures[i - 1], signatures[i]
        if a is not None and b is not None and float(np.abs(a - b).mean()) > threshold:
            cuts.add(i)
    return cuts


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def build_tracks(detections: list[list[Face]], settings: TrackSettings, cuts: set[int] | None = None) -> list[Track]:
    """Greedy frame-to-frame association by IoU with each live track's last box; a cut ends every track."""
    tracks: list[Track] = []
    live: list[Track] = []
    for index, faces in enumerate(detections):
        if cuts and index in cuts:
            live = []
        live = [t for t in live if index - t.frames[-1] <= settings.max_gap + 1]
        pairs = sorted(
            ((iou(t.faces[-1].bbox, f.bbox), ti, fi) for ti, t in enumerate(live) for fi, f in enumerate(faces)),
            reverse=True,
        )
        used_tracks, used_faces = set(), set()
        for score, ti, fi in pairs:
            if score < settings.iou_threshold or ti in used_tracks or fi in used_faces:
                continue
            live[ti].frames.append(index)
            live[ti].faces.append(faces[fi])
            used_tracks.add(ti)
            used_faces.add(fi)
        for fi, face in enumerate(faces):
            if fi not in used_faces:
                track = Track(len(tracks), [index], [face])
                tracks.append(track)
                live.append(track)
    return tracks


def _alpha(cutoff: float, rate: float) -> float:
    tau = 1.0 / (2 * math.pi * cutoff)
    return 1.0 / (1.0 + tau * rate)


def one_euro(signal: np.ndarray, rate: float, min_cutoff: float, beta: float, d_cutoff: float = 1.0) -> np.ndarray:
    """Causal One-Euro filter (Casiez et al. 2012) over axis 0 of `signal` (T, ...)."""
    out = np.empty_like(signal, dtype=np.float64)
    out[0] = signal[0]
    deriv = np.zeros_like(signal[0], dtype=np.float64)
    a_d = _alpha(d_cutoff, rate)
    for i in range(1, len(signal)):
        raw_d = (signal[i] - out[i - 1]) * rate
        deriv = a_d * raw_d + (1 - a_d) * deriv
        cutoff = min_cutoff + beta * np.abs(deriv)
        a = 1.0 / (1.0 + rate / (2 * math.pi * cutoff))
        # written as a step toward the input: a still input then gives exactly itself (a * x + (1 - a) * x need not)
        out[i] = out[i - 1] + a * (signal[i] - out[i - 1])
    return out


def smooth_zero_phase(signal: np.ndarray, rate: float, settings: TrackSettings) -> np.ndarray:
    """One-Euro run forward and backward and averaged: the two lags cancel, so there is no delay."""
    if len(signal) < 3:
        return np.asarray(signal, np.float64)
    forward = one_euro(signal, rate, settings.min_cutoff, settings.beta, settings.d_cutoff)
    backward = one_euro(signal[::-1], rate, settings.min_cutoff, settings.beta, settings.d_cutoff)[::-1]
    return (forward + backward) / 2


def _points(face: Face) -> np.ndarray:
    return face.landmarks if face.landmarks is not None else face.kps


def dense_track(track: Track) -> tuple[list[int], np.ndarray, list[bool]]:
    """Frames from first to last detection with points linearly interpolated over gaps; flags mark filled frames."""
    frames = list(range(track.frames[0], track.frames[-1] + 1))
    known = np.array(track.frames)
    pts = np.stack([_points(f) for f in track.faces])  # (K, P, 2)
    flat = pts.reshape(len(known), -1)
    dense = np.stack([np.interp(frames, known, flat[:, j]) for j in range(flat.shape[1])], axis=1)
    filled = [f not in set(track.frames) for f in frames]
    return frames, dense.reshape(len(frames), *pts.shape[1:]), filled


def smooth_track(track: Track, fps: float, settings: TrackSettings) -> tuple[list[int], np.ndarray, list[bool]]:
    frames, points, filled = dense_track(track)
    return frames, smooth_zero_phase(points, fps, settings), filled

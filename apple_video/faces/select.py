"""Which faces to swap, with FaceFusion's selector vocabulary (reference | one | many)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from apple_video.faces.align import kps_from_68
from apple_video.faces.track import TrackSettings, build_tracks, smooth_track
from apple_video.faces.types import Face, FaceTarget, Track
from apple_video.settings import SelectorSettings

logger = logging.getLogger(__name__)

def sort_faces(faces: list[Face], order: str) -> list[Face]:
    keys = {
        "large-small": lambda f: -f.area,
        "small-large": lambda f: f.area,
        "left-right": lambda f: f.bbox[0],
        "right-left": lambda f: -f.bbox[2],
        "top-bottom": lambda f: f.bbox[1],
        "bottom-top": lambda f: -f.bbox[3],
    }
    return sorted(faces, key=keys[order])


def identity_distance(a: np.ndarray, b: np.ndarray) -> float:
    """0 (same) .. 1 (far). dlib 128-D: Euclidean / 2 (its 0.6 'same person' line -> 0.3);
    ArcFace 512-D: (1 - cosine) / 2, as FaceFusion maps it."""
    if a.shape[-1] == 128:
        return float(np.linalg.norm(a - b) / 2)
    cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
    return (1 - cos) / 2


@dataclass
class Selection:
    targets: dict[int, list[FaceTarget]]  # frame index -> faces to swap
    skipped_small: int
    tracks: list[Track]


def _track_of(tracks: list[Track], frame: int, face: Face) -> Track | None:
    for track in tracks:
        if frame in track.frames and track.faces[track.frames.index(frame)] is face:
            return track
    return None


def _reference_tracks(tracks: list[Track], detections: list[list[Face]], settings: SelectorSettings) -> list[Track]:
    frame = settings.reference_frame_number
    if frame is None:
        frame = next((i for i, faces in enumerate(detections) if faces), None)
    if frame is None or frame >= len(detections) or not detections[frame]:
        return []
    ordered = sort_faces(detections[frame], settings.order)
    reference = ordered[min(settings.reference_face_position, len(ordered) - 1)]
    ref_track = _track_of(tracks, frame, reference)
    chosen = [ref_track] if ref_track else []
    ref_embedding = ref_track.embedding() if ref_track else None
    if ref_embedding is not None:
        for track in tracks:
            emb = track.embedding()
            if track is not ref_track and emb is not None and identity_distance(emb, ref_embedding) < settings.reference_face_distance:
                chosen.append(track)
    return chosen


def select_targets(
    detections: list[list[Face]], fps: float, selector: SelectorSettings, tracking: TrackSettings,
    cuts: set[int] | None = None,
) -> Selection:
    """Track all detections (tracks end at cuts), choose tracks per the selector mode, return smoothed targets."""
    skipped = sum(1 for faces in detections for f in faces if f.size < selector.min_face_size)
    kept = [[f for f in faces if f.size >= selector.min_face_size] for faces in detections]
    tracks = build_tracks(kept, tracking, cuts)
    if selector.mode == "reference":
        chosen = _reference_tracks(tracks, kept, selector)
    elif selector.mode == "many":
        chosen = tracks
    else:
        firsts = {i: sort_faces(faces, selector.order)[0] for i, faces in enumerate(kept) if faces}
        chosen = [t for t in tracks if any(firsts.get(fr) is fc for fr, fc in zip(t.frames, t.faces, strict=True))]
    targets: dict[int, list[FaceTarget]] = {}
    for track in chosen:
        frames, points, filled = smooth_track(track, fps, tracking)
        for frame, pts, was_filled in zip(frames, points, filled, strict=True):
            if selector.mode == "one" and not was_filled:
                face = track.faces[track.frames.index(frame)]
                if firsts.get(frame) is not face:
                    continue
            landmarks = pts if pts.shape[0] == 68 else None
            kps = kps_from_68(pts) if landmarks is not None else pts
            targets.setdefault(frame, []).append(FaceTarget(frame, track.track_id, kps, landmarks, was_filled))
    return Selection(targets, skipped, tracks)

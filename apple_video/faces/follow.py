"""Faces followed from frame to frame between full-frame searches: the video analysis' detector loop.

A full-frame HOG search costs ~20 ms at 640 px; a face already found needs only a look around where it was. So
a chunk is searched in full on its first frame, every `full_every`-th frame and any frame where a followed face
is lost; in between, each face is confirmed by the HOG in a small window around its last box (at a scale where
the face is ~ROI_FACE px) and its landmarks are refitted starting from the last frame's (`DlibDetector.follow`).
The refit settles on a grid window that depends on the frame alone, so a still shot gives the same landmarks on
followed and searched frames. A face that a full search finds and following did not (it entered the shot, or the
last search missed it) is followed backwards over the frames since the previous search, so it is swapped from
the frame it appeared in. A cut (the frame's thumbnail changed as `find_cuts` sees it) is searched in full and
nothing is followed across it. Make one per chunk: results then depend only on the chunk's frames."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from apple_video.faces.detect import FaceDetector, ScaleSearch
from apple_video.faces.track import frame_signature, iou
from apple_video.faces.types import Face
from apple_video.settings import TrackSettings

FULL_EVERY = 8  # frames between full-frame searches while every face is followed
SAME_FACE = 0.3  # box IoU above which two boxes are one face


@runtime_checkable
class Follows(Protocol):
    """A detector that can follow a face into the next frame (dlib HOG today)."""

    def follow(self, rgb: np.ndarray, face: Face) -> Face | None:
        """`face` (found in a neighbouring frame) in this frame, or None when it is not confirmed there."""


def _matched(face: Face, others: Iterable[Face]) -> bool:
    return any(iou(face.bbox, other.bbox) > SAME_FACE for other in others)


@dataclass
class _Seen:
    index: int
    rgb: np.ndarray
    faces: list[Face]


@dataclass
class FaceFollower:
    """Faces (no identity embeddings) on each frame of one chunk, in order; see the module docstring."""

    detector: FaceDetector
    full_every: int = FULL_EVERY
    cut_threshold: float = TrackSettings.cut_threshold  # a cut: nothing is followed across it, either way
    search: ScaleSearch = field(init=False)
    recent: list[_Seen] = field(default_factory=list)  # the frames since the last full search, that one included
    signature: np.ndarray | None = None  # the last frame's thumbnail

    def __post_init__(self) -> None:
        self.search = ScaleSearch(self.detector)

    @property
    def follows(self) -> bool:
        return isinstance(self.detector, Follows) and tuple(self.detector.settings.angles) == (0,)

    @property
    def used(self) -> float | None:
        return self.search.used

    def detect(self, index: int, rgb: np.ndarray) -> list[Face]:
        """The faces of this frame; faces found later in the chunk may still be added to the returned list (a face
        followed backwards from the next full search)."""
        if not self.follows:
            return self.search.detect(index, rgb, embed=False)
        signature = frame_signature(rgb)
        if self.signature is not None and float(np.abs(signature - self.signature).mean()) > self.cut_threshold:
            self.recent = []  # a new shot: searched in full, and its faces not followed back into the last one
        self.signature = signature
        faces = self._followed(rgb) if self.recent and index % self.full_every else None
        if faces is None:
            faces = self.search.detect(index, rgb, embed=False)
            previous = self.recent[-1].faces if self.recent else []
            for face in faces:
                if not _matched(face, previous):
                    self._follow_back(face)
            self.recent = []
        self.recent.append(_Seen(index, rgb, faces))
        return faces

    def _followed(self, rgb: np.ndarray) -> list[Face] | None:
        """Every face of the last frame followed into this one; None when one is lost (or none was there)."""
        previous = self.recent[-1].faces
        if not previous:
            return None
        faces: list[Face] = []
        for face in previous:
            found = self.detector.follow(rgb, face)
            if found is None:
                return None
            if not any(np.array_equal(found.bbox, other.bbox) for other in faces):
                faces.append(found)
        return faces

    def _follow_back(self, face: Face) -> None:
        """Add `face` to the frames before this search where it can be followed to (newest first)."""
        for seen in reversed(self.recent):
            found = self.detector.follow(seen.rgb, face)
            if found is None or _matched(found, seen.faces):
                return
            seen.faces.append(found)
            face = found


def follow_frames(detector: FaceDetector, frames: Iterable[tuple[int, object, np.ndarray]]
                  ) -> Iterator[tuple[int, np.ndarray, list[Face], float | None]]:
    """(index, rgb, faces, scale used) per frame, faces followed between full searches (one follower: one chunk)."""
    follower = FaceFollower(detector)
    for index, _, rgb in frames:
        faces = follower.detect(index, rgb)
        yield index, rgb, faces, follower.used

"""Faces followed between full-frame searches (apple_video/faces/follow.py): the video analysis searches the whole
frame only now and then, and what it finds must not depend on which frames were searched."""

from __future__ import annotations

import numpy as np
import pytest

from apple_video.engine.analysis import Analyzer
from apple_video.faces.detect import DlibDetector
from apple_video.faces.follow import FULL_EVERY, FaceFollower
from apple_video.settings import DetectorSettings
from tests import synth


class CountingDetector(DlibDetector):
    """dlib with its full-frame searches and its follow calls counted."""

    def __init__(self) -> None:
        super().__init__(DetectorSettings())
        self.searches = 0
        self.follows = 0

    def detect(self, rgb, embed=True, scale=None):
        self.searches += 1
        return super().detect(rgb, embed, scale)

    def follow(self, rgb, face):
        self.follows += 1
        return super().follow(rgb, face)


def _frames(patch: np.ndarray, placements: list[synth.Placement | None], size=(480, 360)) -> list[np.ndarray]:
    bg = synth.background(*size, seed=4)
    return [bg.copy() if where is None else synth.paste_patch(bg, patch, where) for where in placements]


def _landmarks(found: dict, index: int) -> list[np.ndarray]:
    return [face.landmarks for face in found[index]]


def test_a_still_shot_gives_the_same_landmarks_on_followed_and_searched_frames(astronaut_patch) -> None:
    frames = _frames(astronaut_patch, [synth.Placement(240, 180, 1.0)] * 20)
    detector = CountingDetector()
    found = Analyzer(detector).analyze([(i, i, rgb) for i, rgb in enumerate(frames)])
    assert detector.follows >= 20 - 4 and detector.searches < 20 / 2  # most frames were followed, not searched
    first = _landmarks(found, 0)
    assert len(first) == 1
    for index in range(1, 20):
        assert len(found[index]) == 1
        assert np.array_equal(_landmarks(found, index)[0], first[0]), index  # bit-exact: the fit's fixed point


def test_followed_faces_match_a_search_on_every_frame(astronaut_patch, clip_frames) -> None:
    """Followed landmarks are the ones a full search on that frame settles on, on most frames exactly, elsewhere
    within a pixel (measured: 28 of 30 frames identical, 0.4 px at most on a 95-128 px face)."""
    frames = clip_frames[:30]
    followed = Analyzer(DlibDetector(DetectorSettings())).analyze([(i, i, rgb) for i, rgb in enumerate(frames)])
    searched = FaceFollower(DlibDetector(DetectorSettings()), full_every=1)
    identical = 0
    for index, rgb in enumerate(frames):
        reference = searched.detect(index, rgb)
        assert len(followed[index]) == len(reference) == 1, index
        error = np.sqrt(((followed[index][0].landmarks - reference[0].landmarks) ** 2).sum(1)).mean()
        face = reference[0].bbox[2] - reference[0].bbox[0]
        assert error < 0.01 * face, (index, error)
        identical += int(error == 0.0)
    assert identical >= 0.8 * len(frames)


def test_a_face_entering_between_searches_is_found_from_its_first_frame(astronaut_patch) -> None:
    """The face appears on a frame that is not searched in full: the next search finds it and it is followed back
    to the frame it entered on, so no frame with the face goes unswapped."""
    enter = FULL_EVERY + 3
    placements = [None] * enter + [synth.Placement(240, 180, 1.0)] * (2 * FULL_EVERY)
    frames = _frames(astronaut_patch, placements)
    detector = CountingDetector()
    follower = FaceFollower(detector)
    found = [follower.detect(i, rgb) for i, rgb in enumerate(frames)]  # lists may grow after they are returned
    assert [len(faces) for faces in found] == [0] * enter + [1] * (2 * FULL_EVERY)


def test_a_face_leaving_is_not_followed_onto_the_background(astronaut_patch) -> None:
    leave = FULL_EVERY + 2
    placements = [synth.Placement(240, 180, 1.0)] * leave + [None] * FULL_EVERY
    found = Analyzer(CountingDetector()).analyze([(i, i, rgb) for i, rgb in enumerate(_frames(astronaut_patch,
                                                                                                 placements))])
    assert [len(found[i]) for i in range(len(placements))] == [1] * leave + [0] * FULL_EVERY


def test_a_cut_is_searched_in_full_and_nothing_is_followed_across_it(astronaut_patch, hopper) -> None:
    """Shot one: the astronaut; shot two (another backdrop), from a frame that is not a search frame: Grace Hopper
    where the astronaut was. Following would carry the astronaut's landmarks onto her face; the cut is searched in
    full instead, and nothing of shot two is followed back into shot one."""
    from tests.conftest import HOPPER_FACE_BOX

    cut = FULL_EVERY + 3
    first = _frames(astronaut_patch, [synth.Placement(240, 180, 1.0)] * cut)
    hopper_patch = synth.face_patch(hopper, HOPPER_FACE_BOX, margin=0.25)[::2, ::2]
    second = [synth.paste_patch(np.full((360, 480, 3), 200, np.uint8), hopper_patch, synth.Placement(240, 180, 1.0))]
    detector = CountingDetector()
    follower = FaceFollower(detector)
    found, searched = [], []
    for index, rgb in enumerate(first + second * 6):
        before = detector.searches
        found.append(follower.detect(index, rgb))
        if detector.searches > before:
            searched.append(index)
    assert cut in searched
    assert [len(faces) for faces in found] == [1] * (cut + 6)
    fresh = FaceFollower(DlibDetector(DetectorSettings()), full_every=1).detect(0, second[0])
    assert np.array_equal(found[cut][0].landmarks, fresh[0].landmarks)


@pytest.mark.parametrize("angles", [(0, 90)])
def test_detectors_that_search_turned_frames_are_not_followed(astronaut_patch, angles) -> None:
    detector = DlibDetector(DetectorSettings(angles=angles))
    assert not FaceFollower(detector).follows
    frames = _frames(astronaut_patch, [synth.Placement(240, 180, 1.0)] * 3)
    found = Analyzer(detector).analyze([(i, i, rgb) for i, rgb in enumerate(frames)])
    assert all(len(found[i]) == 1 for i in range(3))

"""The face selector modes and options not covered elsewhere: `one` and `--reference-face-distance`, on a clip with
two real people (the astronaut on the left, Grace Hopper on the right), and through a whole swap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apple_video.engine.run import swap_image
from apple_video.faces.detect import DetectorSettings, create_detector
from apple_video.faces.select import SelectorSettings, identity_distance, select_targets
from apple_video.faces.track import TrackSettings
from apple_video.settings import SwapSettings

MIDDLE = 320  # the two faces sit either side of the frame's middle


@pytest.fixture(scope="module")
def detections(two_person_frames) -> list:
    detector = create_detector(DetectorSettings(name="dlib"))
    found = [detector.detect(frame) for frame in two_person_frames]
    assert all(len(faces) == 2 for faces in found)
    return found


def _sides(selection) -> list[set[str]]:
    return [{"left" if t.kps[:, 0].mean() < MIDDLE else "right" for t in targets}
            for _, targets in sorted(selection.targets.items())]


def test_mode_one_swaps_the_first_face_of_each_frame_in_the_order(detections) -> None:
    frames = len(detections)
    for order, side in (("left-right", "left"), ("right-left", "right")):
        selection = select_targets(detections, 12.0, SelectorSettings(mode="one", order=order), TrackSettings())
        assert sorted(selection.targets) == list(range(frames))
        assert all(len(targets) == 1 for targets in selection.targets.values())
        assert _sides(selection) == [{side}] * frames, order


def test_reference_face_distance_adds_tracks_closer_than_it(detections) -> None:
    reference = SelectorSettings(mode="reference", order="left-right", reference_face_position=0)
    alone = select_targets(detections, 12.0, reference, TrackSettings())
    assert len(alone.tracks) == 2
    left, right = sorted(alone.tracks, key=lambda t: t.faces[0].bbox[0])
    distance = identity_distance(left.embedding(), right.embedding())
    assert 0.3 < distance < 1.0, distance  # two different people: apart by more than the default 0.3

    def chosen_sides(threshold: float) -> list[set[str]]:
        settings = SelectorSettings(mode="reference", order="left-right", reference_face_distance=threshold)
        return _sides(select_targets(detections, 12.0, settings, TrackSettings()))

    frames = len(detections)
    assert chosen_sides(distance - 0.01) == [{"left"}] * frames
    assert chosen_sides(distance + 0.01) == [{"left", "right"}] * frames


@pytest.mark.parametrize(("mode", "order", "changed"), [("one", "left-right", "left"), ("one", "right-left", "right"),
                                                        ("many", "left-right", "both")])
def test_selector_modes_on_a_swapped_image(tmp_path: Path, source_photo: Path, two_person_frames, mode, order,
                                           changed) -> None:
    target = tmp_path / "two.png"
    frame = two_person_frames[0]
    Image.fromarray(frame).save(target)
    output = tmp_path / "out.png"
    settings = SwapSettings(swapper="classic", selector=SelectorSettings(mode=mode, order=order))
    summary = swap_image([source_photo], target, output, settings)
    assert summary.faces_swapped == (2 if changed == "both" else 1)
    diff = (np.asarray(Image.open(output))[..., :3] != frame).any(axis=2)
    left, right = diff[:, :MIDDLE].sum(), diff[:, MIDDLE:].sum()
    assert (left > 1000) == (changed in ("left", "both")), (left, right)
    assert (right > 1000) == (changed in ("right", "both")), (left, right)

"""Rows in model calls of one size: the padding both the renderer and the compiled pipeline rely on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apple_video.batches import batch_rows, run_in_batches
from apple_video.engine.render import Renderer
from apple_video.faces.detect import create_detector
from apple_video.faces.sources import source_faces
from apple_video.faces.types import FaceTarget
from apple_video.settings import DetectorSettings, ModelOptions, SwapSettings
from apple_video.swappers.apple import AppleSwapper


def test_short_last_call_repeats_its_last_row() -> None:
    assert batch_rows(5, 3) == [([0, 1, 2], 3), ([3, 4, 4], 2)]
    assert batch_rows(2, 4) == [([0, 1, 1, 1], 2)]
    assert batch_rows(4, 2) == [([0, 1], 2), ([2, 3], 2)]
    assert batch_rows(0, 3) == []


def test_without_padding_the_last_call_is_shorter() -> None:
    assert batch_rows(5, 3, pad=False) == [([0, 1, 2], 3), ([3, 4], 2)]


def test_padding_results_are_dropped_and_every_call_has_the_size() -> None:
    sizes: list[int] = []

    def run(rows: list[int]) -> list[str]:
        sizes.append(len(rows))
        return [f"row{i}" for i in rows]

    calls = run_in_batches(7, 3, run)
    assert sizes == [3, 3, 3]
    assert [row for call in calls for row in call] == [f"row{i}" for i in range(7)]


def test_batch_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        batch_rows(3, 0)


def test_a_face_at_the_end_of_a_group_renders_as_in_its_middle(source_photo: Path, astronaut: np.ndarray) -> None:
    """The renderer's use of it: a face alone in a group's last call (padded to the batch size) comes out equal to
    the same face in a full call. Unpadded, the tiny model's float results move by one level here (checked)."""
    settings = SwapSettings(swapper="apple", model=ModelOptions(preset="tiny", steps=2, recipe="student"), seed=3,
                            batch_size=2)
    detector = create_detector(DetectorSettings(name="dlib"))
    face = detector.detect(astronaut)[0]
    sources = source_faces([np.asarray(Image.open(source_photo).convert("RGB"))], ["source"], detector, 128)
    renderer = Renderer(settings, AppleSwapper.from_options(settings.model), sources)
    frames = [(3, 3, astronaut), (4, 4, np.roll(astronaut, 9, axis=0)), (40, 40, astronaut)]  # calls: [3, 4], [40]
    targets = {i: [FaceTarget(i, 7, face.kps, face.landmarks)] for i in (3, 4, 40)}
    rendered, stats = renderer.render(frames, targets)
    assert stats.faces_swapped == 3
    assert np.array_equal(rendered[0][2], rendered[2][2]) and not np.array_equal(rendered[0][2], astronaut)

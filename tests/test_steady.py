"""Issue 25: still shots stay still, crops resample cleanly, the classic swap holds on turned faces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apple_video.faces.detect import DetectorSettings, ScaleSearch, create_detector
from apple_video.faces.track import one_euro, smooth_zero_phase
from apple_video.media import synth
from apple_video.settings import ModelOptions, SwapSettings, TrackSettings

STILL_FRAMES = 30  # chunk of 28: frames 0, 23, 24 (the fine probe), 25, 27 of one chunk and 0, 1 of the next


@pytest.fixture(scope="module")
def detector():
    return create_detector(DetectorSettings(name="dlib"))


def test_one_euro_still_input_gives_itself_exactly() -> None:
    rng = np.random.default_rng(0)
    still = np.repeat(rng.uniform(0, 1000, (1, 68, 2)), 40, axis=0)
    assert np.array_equal(one_euro(still, 30.0, 1.0, 0.01), still)
    assert np.array_equal(smooth_zero_phase(still, 30.0, TrackSettings()), still)
    moving = still + np.linspace(0, 5, 40)[:, None, None]
    assert not np.array_equal(smooth_zero_phase(moving + rng.normal(0, 0.3, moving.shape), 30.0, TrackSettings()),
                              moving)


@pytest.mark.parametrize("scale,size", [(0.5, (480, 360)), (1.6, (480, 360)), (4.0, (1920, 1080))])
def test_landmarks_do_not_depend_on_the_detection_scale(detector, astronaut_patch, scale, size) -> None:
    """A face's landmarks are a function of the frame: whatever scale found its box, the same points."""
    frame = synth.paste_patch(synth.background(*size), astronaut_patch, synth.Placement(size[0] / 2.1, size[1] / 1.9,
                                                                                         scale))
    found = []
    for working in (detector.base_scale(frame.shape), detector.fine_scale(frame.shape), 0.7, 1.0, 1.3):
        faces = detector.detect(frame, False, working)
        if faces:
            found.append(faces[0])
    assert len(found) >= 2
    for face in found[1:]:
        assert np.array_equal(face.landmarks, found[0].landmarks)
        assert np.array_equal(face.bbox, found[0].bbox)
    search = ScaleSearch(detector)
    stream = [search.detect(i, frame, embed=False)[0].landmarks for i in range(26)]
    assert all(np.array_equal(points, found[0].landmarks) for points in stream)


def _still_folder(folder: Path, frame: np.ndarray) -> Path:
    folder.mkdir()
    for i in range(STILL_FRAMES):
        Image.fromarray(frame).save(folder / f"f{i:02d}.png")
    return folder


@pytest.mark.parametrize("swapper", ["classic", "student"])
def test_still_shot_gives_identical_outputs_across_chunks_and_probes(tmp_path: Path, source_photo: Path,
                                                                    astronaut_patch: np.ndarray, swapper: str) -> None:
    from apple_video.engine.run import swap_folder

    # a small face: the detector's scale search moves off its first scale after frame 0 and probes at frame 24
    frame = synth.paste_patch(synth.background(480, 360), astronaut_patch, synth.Placement(230, 170, 0.6))
    folder = _still_folder(tmp_path / "still", frame)
    if swapper == "classic":
        settings = SwapSettings(swapper="classic", chunk_frames=28, batch_size=3)
    else:
        settings = SwapSettings(swapper="apple", model=ModelOptions(preset="tiny", steps=1, recipe="student"),
                                chunk_frames=28, batch_size=3)
    swap_folder([source_photo], folder, tmp_path / "out", settings)
    outs = [np.asarray(Image.open(tmp_path / "out" / f"f{i:02d}.png")) for i in range(STILL_FRAMES)]
    assert not np.array_equal(outs[0], frame)
    for i, out in enumerate(outs):
        assert np.array_equal(out, outs[0]), (i, int(np.abs(out.astype(int) - outs[0]).max()))

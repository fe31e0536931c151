"""Real test media, built once per session from photos shipped by packages (nothing large is committed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
from PIL import Image

from tests import synth

HOPPER_FACE_BOX = (161, 137, 376, 352)
CLIP_SIZE = (480, 360)
CLIP_FRAMES = 45
NOFACE_TAIL = 6


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def hopper() -> np.ndarray:
    return np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


@pytest.fixture(scope="session")
def astronaut_patch(astronaut: np.ndarray) -> np.ndarray:
    return synth.face_patch(astronaut, synth.ASTRONAUT_FACE_BOX)


@pytest.fixture(scope="session")
def source_photo(media_dir: Path, hopper: np.ndarray) -> Path:
    path = media_dir / "source.jpg"
    Image.fromarray(hopper).save(path, quality=92)
    return path


@pytest.fixture(scope="session")
def clip_path_plan(astronaut_patch: np.ndarray) -> list[synth.Placement]:
    return synth.smooth_path(CLIP_FRAMES, *CLIP_SIZE, astronaut_patch.shape[1])


@pytest.fixture(scope="session")
def clip_frames(astronaut_patch: np.ndarray, clip_path_plan) -> list[np.ndarray]:
    """45 frames of a moving, scaling real face, then 6 frames without a face."""
    frames = synth.face_frames(astronaut_patch, CLIP_SIZE, clip_path_plan)
    return frames + [synth.background(*CLIP_SIZE)] * NOFACE_TAIL


@pytest.fixture(scope="session")
def face_clip(media_dir: Path, clip_frames: list[np.ndarray]) -> Path:
    return synth.write_clip(media_dir / "face.mp4", clip_frames, fps=15)


@pytest.fixture(scope="session")
def noface_clip(media_dir: Path) -> Path:
    frames = [synth.background(320, 240, seed=i % 3) for i in range(20)]
    return synth.write_clip(media_dir / "noface.mp4", frames, fps=10)


@pytest.fixture(scope="session")
def frames_dir(media_dir: Path, clip_frames: list[np.ndarray]) -> Path:
    folder = media_dir / "frames"
    folder.mkdir()
    for i, frame in enumerate(clip_frames[::3]):
        Image.fromarray(frame).save(folder / f"frame{i + 1}.png")
    return folder


@pytest.fixture(scope="session")
def two_person_frames(astronaut_patch: np.ndarray, hopper: np.ndarray) -> list[np.ndarray]:
    hopper_patch = synth.face_patch(hopper, HOPPER_FACE_BOX, margin=0.25)
    hopper_patch = np.asarray(Image.fromarray(hopper_patch).resize((200, 200), Image.LANCZOS))
    bg = synth.background(640, 360, seed=1)
    frames = []
    for i in range(24):
        shift = 20 * np.sin(i / 6)
        frame = synth.paste_patch(bg, astronaut_patch, synth.Placement(170 + shift, 180, 1.0))
        frames.append(synth.paste_patch(frame, hopper_patch, synth.Placement(470 - shift, 180 + shift / 2, 0.95)))
    return frames


@pytest.fixture(scope="session")
def two_person_clip(media_dir: Path, two_person_frames: list[np.ndarray]) -> Path:
    return synth.write_clip(media_dir / "two.mp4", two_person_frames, fps=12)

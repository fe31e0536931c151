"""Resuming an interrupted job: it continues only when nothing the output depends on changed (settings that change
the output, the input's frames); otherwise it starts over and the output equals a fresh run."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apple_video.engine.run import job_dir_for, swap_folder
from apple_video.settings import MaskSettings, SwapSettings
from tests.jobs import wait_until_rendered

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 3


def _command(source: Path, frames: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", "from cli import main; main()", "swap", str(source), str(frames), "-o", str(output),
            "--swapper", "classic", "--chunk-frames", str(CHUNK), *extra]


def _interrupt(command: list[str], output: Path) -> list[int]:
    """Start the job and kill it once it has rendered a chunk; the chunks it finished."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = job_dir_for(output) / "manifest.json"
    wait_until_rendered(process, output, 180)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = json.loads(manifest.read_text())["rendered"]
    assert done and 0 in done, "killed before the first chunk was rendered"
    return done


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


@pytest.fixture()
def frames(tmp_path: Path, frames_dir: Path) -> Path:
    folder = tmp_path / "frames"
    shutil.copytree(frames_dir, folder)
    return folder


@pytest.mark.slow
def test_frame_edited_in_place_is_rendered_again_on_resume(tmp_path: Path, source_photo: Path, frames: Path) -> None:
    output = tmp_path / "out"
    command = _command(source_photo, frames, output)
    _interrupt(command, output)
    first = frames / "frame1.png"  # in chunk 0, which the killed run finished
    Image.fromarray(np.asarray(Image.open(first))[:, ::-1].copy()).save(first)  # same name, same folder
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "starting over" in result.stderr and "chunks resumed" not in result.stdout
    reference = tmp_path / "reference"
    swap_folder([source_photo], frames, reference, SwapSettings(swapper="classic", chunk_frames=CHUNK))
    got, want = _pixels(output), _pixels(reference)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[name], want[name]) for name in want)


@pytest.mark.slow
def test_a_settings_change_restarts_the_job_and_a_runtime_one_resumes(tmp_path: Path, source_photo: Path,
                                                                       frames: Path) -> None:
    output = tmp_path / "out"
    _interrupt(_command(source_photo, frames, output), output)
    # --workers only says how the job runs: the finished chunks are kept
    result = subprocess.run(_command(source_photo, frames, output, "--workers", "3"), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "chunks resumed" in result.stdout and "starting over" not in result.stderr

    output = tmp_path / "out2"
    _interrupt(_command(source_photo, frames, output), output)
    # a sharper mask edge changes every swapped pixel: nothing of the killed run may be kept
    result = subprocess.run(_command(source_photo, frames, output, "--face-mask-blur", "0.05"), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "starting over" in result.stderr and "chunks resumed" not in result.stdout
    reference = tmp_path / "reference"
    swap_folder([source_photo], frames, reference,
                SwapSettings(swapper="classic", chunk_frames=CHUNK, mask=MaskSettings(blur=0.05)))
    got, want = _pixels(output), _pixels(reference)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[name], want[name]) for name in want)

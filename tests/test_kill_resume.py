"""Interrupted anywhere, resumed identically: a local job killed (SIGKILL) at moments spread over its run ends,
when the same command is run again, on the same bytes as a run never interrupted. The moments are read from the
job folder's own state (no test hook in the product): during analysis, between rendered chunks, while the chunks
are joined into the output's temp file, and while renaming (the joined file is put in place and the job folder
removed after it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from apple_video.engine.layout import file_identity, job_dir_for, removing_dir_for
from tests.jobs import manifest_of

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 8  # 51 frames: 7 chunks


def _command(source: Path, clip: Path, output: Path, chunk: int = CHUNK) -> list[str]:
    return [sys.executable, "-c", "from cli import main; main()", "swap", str(source), str(clip), "-o", str(output),
            "--swapper", "classic", "--chunk-frames", str(chunk)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _analysing(output: Path, size: int) -> bool:
    manifest = manifest_of(output)
    return manifest is not None and 0 < len(manifest["analyzed"]) < len(manifest["chunks"])


def _rendering(output: Path, size: int) -> bool:
    manifest = manifest_of(output)
    return manifest is not None and 0 < len(manifest["rendered"]) < len(manifest["chunks"])


def _joining(output: Path, size: int) -> bool:
    return any(output.parent.glob(f".{output.stem}.partial-*{output.suffix}")) or any(
        job_dir_for(output).glob(f".*.partial-*{output.suffix}"))


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:  # renamed or removed meanwhile
        return False


def _renaming(output: Path, size: int) -> bool:
    """The joined file is complete (the finished output's size) but not yet in place, or in place while the job
    folder is still there."""
    job_dir = job_dir_for(output)
    if not job_dir.exists():
        return False
    if output.exists():
        return True
    beside = [*output.parent.glob(f".*{output.suffix}"), *job_dir.glob(f"*{output.suffix}"),
              *job_dir.glob(f".*{output.suffix}")]
    return any(_has_size(path, size) for path in beside)


MOMENTS: dict[str, Callable[[Path, int], bool]] = {"analysis": _analysing, "render": _rendering, "join": _joining,
                                                   "rename": _renaming}


def _kill_when(command: list[str], output: Path, moment: Callable[[Path, int], bool], size: int) -> bool:
    """Start the job and SIGKILL it as soon as `moment` holds; True when the files it left show that moment (False
    when it finished first, or the kill landed after the moment had passed)."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    try:
        while process.poll() is None:
            if moment(output, size):
                process.send_signal(signal.SIGKILL)
                process.wait()
                return moment(output, size)
            time.sleep(0.001)
        return False
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _rerun_ends_on(reference: bytes, command: list[str], output: Path) -> None:
    """The same command run again succeeds, writes the uninterrupted run's bytes and leaves nothing behind."""
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    assert result.returncode == 0, result.stderr
    assert output.read_bytes() == reference
    assert not job_dir_for(output).exists() and not list(output.parent.glob(".*partial*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, source_photo: Path, face_clip: Path) -> bytes:
    output = tmp_path_factory.mktemp("reference") / "out.mp4"
    result = subprocess.run(_command(source_photo, face_clip, output), cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=_env())
    assert result.returncode == 0, result.stderr
    return output.read_bytes()


@pytest.mark.parametrize("name", list(MOMENTS))
def test_killed_job_resumes_to_the_same_bytes(tmp_path: Path, source_photo: Path, face_clip: Path, reference: bytes,
                                               name: str) -> None:
    for attempt in range(5):  # the join and the rename last milliseconds: a poll may miss them, then the job is
        folder = tmp_path / f"attempt{attempt}"  # run again from scratch, in a folder of its own
        folder.mkdir()
        output = folder / "out.mp4"
        command = _command(source_photo, face_clip, output)
        if _kill_when(command, output, MOMENTS[name], len(reference)):
            break
    else:
        pytest.fail(f"the job was never caught {name}")
    if name != "rename":
        assert not output.exists(), "killed before the end: no output yet"
    _rerun_ends_on(reference, command, output)


def test_killed_right_after_the_rename_only_the_folder_is_removed(tmp_path: Path, source_photo: Path,
                                                                   face_clip: Path, reference: bytes) -> None:
    """The state a kill between the rename and the folder's removal leaves (the poll above lands there in about one
    run of four), made every time: the job is caught with its joined file complete and recorded, and the rename
    it would have done next is done. The same command then only removes the folder; another command (other chunks)
    is refused, the output left as it is."""
    for attempt in range(12):  # the recorded-but-not-yet-renamed moment lasts a write and a rename: a few tries
        folder = tmp_path / f"attempt{attempt}"
        folder.mkdir()
        output = folder / "out.mp4"
        command = _command(source_photo, face_clip, output)
        if not _kill_when(command, output, _renaming, len(reference)):
            continue
        recorded = (manifest_of(output) or {}).get("joined")
        if output.exists() and file_identity(output) == recorded:
            break  # killed after the rename itself: the state this test makes
        joined = [p for p in job_dir_for(output).glob(f"*{output.suffix}") if file_identity(p) == recorded]
        if joined and not output.exists():
            joined[0].rename(output)
            break
    else:
        pytest.fail("the job was never caught with its joined file recorded")
    other = subprocess.run(_command(source_photo, face_clip, output, chunk=CHUNK - 2), cwd=ROOT, capture_output=True,
                           text=True, timeout=600, env=_env())
    assert other.returncode == 2 and "output exists" in other.stderr.strip().splitlines()[-1], other.stderr
    assert output.read_bytes() == reference and job_dir_for(output).exists()
    _rerun_ends_on(reference, command, output)


def test_a_job_folder_left_half_deleted_is_removed_by_the_next_run(tmp_path: Path, source_photo: Path,
                                                                    face_clip: Path, reference: bytes) -> None:
    """A finished job's folder is renamed away before it is deleted; a kill during the deletion leaves that renamed
    folder, and the next command on the output removes it (here: a rerun of the finished job, refused as usual)."""
    output = tmp_path / "out.mp4"
    output.write_bytes(reference)
    leftover = removing_dir_for(output)
    (leftover / "chunks").mkdir(parents=True)
    (leftover / "chunks" / "00000.mp4").write_bytes(b"half")
    result = subprocess.run(_command(source_photo, face_clip, output), cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=_env())
    assert result.returncode == 2 and "output exists" in result.stderr.strip().splitlines()[-1], result.stderr
    assert not leftover.exists() and output.read_bytes() == reference

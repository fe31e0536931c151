"""Batches submitted the way Ray operators submit them: `ray job submit` to a head with the dashboard, the job's
log, its exit status, `ray job stop` and a resubmit that resumes. One head in a loopback-only network namespace
runs all the jobs (tests/ray_job_batch.py); each test reads its part of what happened."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import synth
from tests.test_cluster import _run_in_netns as _in_netns  # one loopback-only namespace runner

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from cli import main; main()"]
ARGS = ["--swapper", "classic", "--chunk-frames", "12"]
CLIPS = ("a.mp4", "b.mp4")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                 reason="needs root for namespaces")]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory, source_photo: Path, clip_frames) -> tuple[Path, dict]:
    """A short clip and a long one (the stop comes between them), a local run at one thread, then the jobs."""
    data = tmp_path_factory.mktemp("jobs")
    (data / "clips").mkdir()
    (data / "clips_broken").mkdir()
    shutil.copy(source_photo, data / "source.jpg")
    synth.write_clip(data / "clips" / "a.mp4", clip_frames[:20], fps=15)
    synth.write_clip(data / "clips" / "b.mp4", clip_frames + clip_frames[::-1], fps=15)
    shutil.copy(data / "clips" / "a.mp4", data / "clips_broken" / "a.mp4")
    (data / "clips_broken" / "broken.mp4").write_bytes(b"not a video" * 100)
    args = [str(data / "source.jpg"), str(data / "clips"), *ARGS]
    local = subprocess.run([*CLI, "swap", *args, "-o", str(data / "out_local"), "--executor", "local"], cwd=ROOT,
                           capture_output=True, text=True, timeout=900,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert local.returncode == 0, local.stderr
    result = _in_netns([sys.executable, "tests/ray_job_batch.py", str(data), *args], timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    (data / "runs.json").write_text(json.dumps(runs, indent=1))  # what happened, for a look after a failure
    assert runs.pop("left_running") == []  # stopping the head's process group stopped every Ray process
    return data, runs


def _same_as_local(data: Path, output: str) -> None:
    for clip in CLIPS:
        assert (data / output / clip).read_bytes() == (data / "out_local" / clip).read_bytes(), (output, clip)


def _no_leftovers(folder: Path) -> None:
    """No lock (released with the job) and no half-written file: only finished outputs and the job folders."""
    left = [p.name for p in folder.iterdir() if p.name.endswith(".lock") or ".partial-" in p.name]
    assert not left, left


def test_submitted_batch_equals_a_local_run_and_logs_its_progress(jobs) -> None:
    data, runs = jobs
    run = runs["undisturbed"]
    assert run["submit_rc"] == 0 and run["status"] == "SUCCEEDED", run["submit_tail"]
    log = run["logs"]
    assert "analyze: " in log and "swap: " in log, log[-3000:]  # progress lines, the non-terminal form
    assert "\r" not in log
    assert "2 of 2 clips done" in log, log[-3000:]
    assert "Traceback" not in log
    _same_as_local(data, "out_job")
    _no_leftovers(data / "out_job")


def test_stopped_job_resubmitted_resumes_and_equals_an_uninterrupted_run(jobs) -> None:
    data, runs = jobs
    stopped = runs["stopped"]
    assert stopped["stop_rc"] == 0 and stopped["status"] == "STOPPED", stopped["stop_out"]
    assert stopped["finished_at_stop"] == ["a.mp4"], stopped  # stopped mid-run: one clip done, the other not
    assert "b.mp4" not in stopped["after_stop"], stopped["after_stop"]  # no half-written output
    assert not [name for name in stopped["after_stop"] if name.endswith(".lock") or ".partial-" in name], stopped
    resumed = runs["resubmitted"]
    assert resumed["submit_rc"] == 0 and resumed["status"] == "SUCCEEDED", resumed["submit_tail"]
    assert "a.mp4: done earlier" in resumed["logs"], resumed["logs"][-3000:]
    assert "2 of 2 clips done" in resumed["logs"]
    _same_as_local(data, "out_stopped")
    for clip in CLIPS:
        assert (data / "out_stopped" / clip).read_bytes() == (data / "out_job" / clip).read_bytes(), clip
    _no_leftovers(data / "out_stopped")


def test_a_failed_clip_fails_the_job_with_one_line(jobs) -> None:
    data, runs = jobs
    broken = runs["broken"]
    assert broken["status"] == "FAILED", broken["logs"][-3000:]
    assert broken["submit_rc"] != 0, broken["submit_tail"]
    log = broken["logs"]
    assert "1 of 2 clips done" in log, log[-3000:]
    assert [line for line in log.splitlines() if "broken.mp4" in line and "not a readable video" in line], log[-3000:]
    assert "Traceback" not in log
    assert (data / "out_broken" / "a.mp4").is_file() and not (data / "out_broken" / "broken.mp4").exists()

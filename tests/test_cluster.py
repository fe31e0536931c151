"""Batches on Ray as operators run them: a real multi-node cluster without a shared disk, one model build per
render actor, actors sized from the cluster, worker errors as one line, re-runs and per-container encoders."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from apple_video.engine.batch import run_batch
from apple_video.engine.executors import plan_actors, worker_error
from apple_video.errors import DeviceError, InputError, WorkerError
from apple_video.media.video import probe
from apple_video.settings import ModelOptions, SwapSettings
from tests import synth

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from cli import main; main()"]


def _cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


@pytest.fixture
def clips(tmp_path: Path, source_photo: Path, face_clip: Path, two_person_clip: Path, clip_frames) -> Path:
    """Three different clips and the source photo in one folder (the one a worker node cannot see)."""
    data = tmp_path / "data"
    (data / "clips").mkdir(parents=True)
    shutil.copy(source_photo, data / "source.jpg")
    shutil.copy(face_clip, data / "clips" / "a.mp4")
    shutil.copy(two_person_clip, data / "clips" / "b.mp4")
    synth.write_clip(data / "clips" / "c.mp4", clip_frames[::-1][:30], fps=15)
    return data


def _run_in_netns(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """A loopback-only network namespace of our own: the cluster's ports clash with nobody's."""
    script = "ip link set lo up && exec " + " ".join(command)
    process = subprocess.Popen(["unshare", "-n", "bash", "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # only this test's processes: its own process group
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root for namespaces")
def test_cluster_without_shared_disk_equals_local_and_survives_a_lost_node(clips: Path) -> None:
    args = [str(clips / "source.jpg"), str(clips / "clips"), "--swapper", "classic", "--chunk-frames", "12"]
    local = _cli(["swap", *args, "-o", str(clips / "out_local"), "--executor", "local"], OMP_NUM_THREADS="1")
    assert local.returncode == 0, local.stderr
    result = _run_in_netns([sys.executable, "tests/cluster_batch.py", str(clips), *args], timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    assert runs["killed"]["killed"], "the worker node was killed mid-run"
    for name, run in runs.items():
        assert run["rc"] == 0, (name, run["stderr"][-3000:])
        assert "3 of 3 clips done" in run["stdout"]
        noise = [line for line in run["stderr"].splitlines() if ".cc:" in line or "Traceback" in line]
        assert not noise, noise
        for clip in ("a.mp4", "b.mp4", "c.mp4"):
            ours = clips / ("out_ray" if name == "undisturbed" else "out_killed") / clip
            assert ours.read_bytes() == (clips / "out_local" / clip).read_bytes(), (name, clip)


def _short_clips(folder: Path, clip_frames, count: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        synth.write_clip(folder / f"clip{i}.mp4", clip_frames[3 * i : 3 * i + 10], fps=15)
    return folder


@pytest.mark.parametrize("executor, actors", [("local", 1), ("ray", 2)])
def test_batch_builds_the_swapper_once_per_render_actor(tmp_path: Path, source_photo: Path, clip_frames,
                                                         executor: str, actors: int) -> None:
    clips = _short_clips(tmp_path / "clips", clip_frames, 4)
    settings = SwapSettings(swapper="apple", model=ModelOptions(preset="tiny", steps=1), chunk_frames=4,
                            executor=executor, workers=actors if executor == "ray" else None)
    result = run_batch([source_photo], clips, tmp_path / "out", settings)
    assert [s.status for s in result.summaries] == ["ok"] * 4
    assert sum(s.faces_swapped for s in result.summaries) >= 30
    assert len(result.workers) == actors  # every render actor reported...
    assert sum(w.builds for w in result.workers) == actors  # ...and built the model once, not once per clip
    assert sum(w.chunks for w in result.workers) == 4 * 3  # 10 frames in chunks of 4: 3 chunks per clip


def test_actors_come_from_the_cluster_resources() -> None:
    tiny = SwapSettings(swapper="apple", model=ModelOptions(preset="tiny"))
    plan = plan_actors(tiny, {"CPU": 64, "GPU": 8}, cluster=True)
    assert (plan.render, plan.render_gpus, plan.analysis) == (8, 1.0, 64)  # a CPU head in front of 8 GPUs: all 8 used
    half = plan_actors(SwapSettings(swapper="apple", model=ModelOptions(preset="tiny"), num_gpus=0.5),
                       {"CPU": 16, "GPU": 2}, cluster=True)
    assert (half.render, half.render_gpus) == (4, 0.5)
    cpu = plan_actors(SwapSettings(swapper="classic"), {"CPU": 6}, cluster=True)
    assert (cpu.render, cpu.render_gpus, cpu.analysis) == (3, 0.0, 3)
    given = plan_actors(SwapSettings(swapper="classic", workers=2), {"CPU": 2}, cluster=False)
    assert given.render == 2 and given.cpus_each * (given.render + given.analysis) <= 2  # all fit: none waits
    with pytest.raises(DeviceError, match="needs a GPU but the Ray cluster has none"):
        plan_actors(SwapSettings(swapper="apple", model=ModelOptions(preset="krea-512")), {"CPU": 32}, cluster=True)
    with pytest.raises(DeviceError, match="has 0"):
        plan_actors(SwapSettings(swapper="classic", num_gpus=1.0), {"CPU": 4}, cluster=True)


def test_worker_errors_are_one_line() -> None:
    import ray

    from apple_video.engine.executors import connect_ray

    connect_ray(None)

    @ray.remote
    def broken() -> None:
        raise KeyError("frame 7")

    @ray.remote
    def refused() -> None:
        raise InputError("clip.mp4: not a readable video")

    errors = []
    for task in (broken, refused):
        try:
            ray.get(task.remote())
        except Exception as error:  # noqa: BLE001 - the real error Ray raises
            errors.append(worker_error(error))
    internal, ours = errors
    assert isinstance(internal, WorkerError) and "\n" not in str(internal)
    assert str(internal).startswith("internal error on node ") and "KeyError: 'frame 7'" in str(internal)
    assert "--debug" in str(internal) and "raise KeyError" in "".join(internal.__notes__)  # the trace, for --debug
    assert type(ours) is InputError and str(ours) == "clip.mp4: not a readable video"


def test_ray_batch_reports_the_bad_clip_in_one_line_and_finishes_the_others(tmp_path: Path, source_photo: Path,
                                                                           clip_frames) -> None:
    clips = _short_clips(tmp_path / "clips", clip_frames, 2)
    (clips / "bad.mp4").write_bytes((clips / "clip0.mp4").read_bytes()[:2500])
    result = _cli(["swap", str(source_photo), str(clips), "-o", str(tmp_path / "out"), "--swapper", "classic",
                   "--executor", "ray", "--workers", "1"])
    assert result.returncode == 2  # the only failure is a bad input, refused in planning (issue 34: exit 2)
    assert "2 of 3 clips done" in result.stdout and "bad.mp4: FAILED: " in result.stdout
    assert (tmp_path / "out" / "clip0.mp4").exists() and (tmp_path / "out" / "clip1.mp4").exists()
    lines = result.stderr.splitlines()
    assert not [line for line in lines if ".cc:" in line or "Traceback" in line or line.startswith(" ")], lines


def test_batch_rerun_is_done_earlier_and_webm_gets_vp9(tmp_path: Path, source_photo: Path, clip_frames) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    synth.write_clip(clips / "a.mp4", clip_frames[:10], fps=15)
    synth.write_clip(clips / "b.webm", clip_frames[10:20], fps=15, audio_streams=0, codec="libvpx-vp9")
    args = ["swap", str(source_photo), str(clips), "-o", str(tmp_path / "out"), "--swapper", "classic"]
    first = _cli(args)
    assert first.returncode == 0, first.stderr
    assert probe(tmp_path / "out" / "b.webm").codec == "vp9" and probe(tmp_path / "out" / "a.mp4").codec == "h264"
    again = _cli(args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("done earlier") == 2 and "2 of 2 clips done" in again.stdout
    assert "FAILED" not in again.stdout


def test_packets_decode_like_the_file(face_clip: Path) -> None:
    from apple_video.media.video import decode_frames, decode_packets, read_packets

    info = probe(face_clip)
    whole = [f.rgb for f in decode_frames(info)]
    for start, stop in ((0, 16), (16, 37), (37, info.frame_count)):
        frames = list(decode_packets(read_packets(info, start, stop)))
        assert [f.index for f in frames] == list(range(start, stop))
        assert [f.pts for f in frames] == list(info.pts[start:stop])
        assert all(np.array_equal(f.rgb, whole[f.index]) for f in frames)

"""Orchestration overhead and memory of the video engine, measured in one run.

1. On one clip: our wall time (tiny preset, dlib detector) against the sum of its parts run alone: plain PyAV
   decode+encode, detection alone, tiny swap alone -> `overhead ratio local` and `overhead ratio ray`
   (Ray start-up included). Goals: <= 1.25 local, <= 1.5 ray.
2. Peak RSS of the whole CLI process on a 5 s and a 60 s clip (classic swapper) -> `rss ratio 60s/5s`
   (goal <= 1.15: memory is bounded by the chunk, not the clip).
3. A 4-clip batch on Ray (tiny preset): `model builds per run` (goal: one per render actor) and the share of the
   render actors' lifetime spent inside the model's `swap` (goal >= 0.9: no wait at clip boundaries).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from apple_video.engine.analysis import Analyzer
from apple_video.engine.batch import run_batch
from apple_video.engine.clips import load_sources
from apple_video.engine.factories import model_files, quiet_detector
from apple_video.engine.run import swap_video
from apple_video.faces.align import alignment_matrix, warp_crop
from apple_video.media.video import decode_frames, probe
from apple_video.settings import ModelOptions, SwapSettings
from apple_video.swappers.base import CropJob
from apple_video.swappers.factory import create_swapper
from benchmarks.common import ROOT, face_clip, timed
from benchmarks.transcode import plain

SOURCE = ROOT / "examples" / "source.jpg"


def parts(clip: Path, settings: SwapSettings) -> dict[str, float]:
    frames = [f.rgb for f in decode_frames(probe(clip))]
    files = model_files(settings)  # as a job's planner resolves them
    analyzer = Analyzer(quiet_detector(settings.detector, files))  # the detection stage alone: detector + its embedding schedule, no orchestration
    t_detect, found = timed(analyzer.analyze, ((i, i, f) for i, f in enumerate(frames)))
    faces = [found[i] for i in range(len(frames))]
    start = time.perf_counter()
    swapper = create_swapper(settings, files)
    swapper.prepare(load_sources([SOURCE], analyzer.detector, swapper.crop_size))
    size = swapper.crop_size
    jobs = [CropJob(warp_crop(f, alignment_matrix(fs[0].kps, size), size), None, i)
            for i, (f, fs) in enumerate(zip(frames, faces, strict=True)) if fs]
    batch = swapper.auto_batch_size() if settings.batch_size == "auto" else int(settings.batch_size)
    for k in range(0, len(jobs), batch):
        swapper.swap(jobs[k : k + batch])
    t_swap = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        t_transcode, _ = timed(plain, clip, Path(tmp) / "plain.mp4")
    return {"transcode": t_transcode, "detect": t_detect, "swap": t_swap}


def peak_rss(args: list[str]) -> int:
    """Peak resident memory (bytes) of the CLI process and its children, sampled every 20 ms."""
    process = subprocess.Popen([sys.executable, "-c", "from cli import main; main()", *args], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watched = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            rss = watched.memory_info().rss + sum(c.memory_info().rss for c in watched.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    if process.returncode != 0:
        raise SystemExit(process.stderr.read().decode())
    return peak


def batch_on_ray(folder: Path, settings: SwapSettings, clips: int = 4,
                 seconds: float = 4.0) -> tuple[int, int, float, float]:
    """(model builds, render actors, share of their lifetime inside swap, share of their render calls inside swap)
    for one batch on Ray."""
    inputs = folder / "batch"
    inputs.mkdir()
    for i in range(clips):
        face_clip(inputs / f"clip{i}.mp4", seconds=seconds, size=(480, 360), fps=15)
    result = run_batch([SOURCE], inputs, folder / "batch_out", SwapSettings(**{**settings.__dict__, "executor": "ray"}))
    workers = result.workers
    swap = sum(w.swap for w in workers)
    lifetime = swap / max(1e-9, sum(w.lifetime for w in workers))
    return sum(w.builds for w in workers), len(workers), lifetime, swap / max(1e-9, sum(w.busy for w in workers))


def main(seconds: float = 30.0) -> None:
    settings = SwapSettings(swapper="apple", model=ModelOptions(preset="tiny", steps=2), force=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clip = face_clip(folder / "clip.mp4", seconds=seconds, size=(480, 360), fps=15)
        swap_video([SOURCE], clip, folder / "warm.mp4", settings)  # warm-up: first-call costs hit nobody below
        split = parts(clip, settings)
        total = sum(split.values())
        t_local, _ = timed(swap_video, [SOURCE], clip, folder / "local.mp4", settings)
        ray_settings = SwapSettings(**{**settings.__dict__, "executor": "ray", "workers": 2, "force": True})
        t_ray, _ = timed(swap_video, [SOURCE], clip, folder / "ray.mp4", ray_settings)
        print("parts: " + ", ".join(f"{k} {v:.2f}s" for k, v in split.items()) + f" (sum {total:.2f}s)")
        print(f"apple-video local {t_local:.2f}s, ray {t_ray:.2f}s (ray start-up included)")

        short = face_clip(folder / "short.mp4", seconds=5, size=(640, 360), fps=15)
        long = face_clip(folder / "long.mp4", seconds=60, size=(640, 360), fps=15)
        rss = {}
        for name, path in (("5s", short), ("60s", long)):
            rss[name] = peak_rss(["--quiet", "swap", str(SOURCE), str(path), "-o", str(folder / f"rss_{name}.mp4"),
                                  "--swapper", "classic"])
        print(f"peak RSS: 5 s clip {rss['5s'] / 2**20:.0f} MiB, 60 s clip {rss['60s'] / 2**20:.0f} MiB")
        print(f"overhead ratio local: {t_local / total:.2f}")
        print(f"overhead ratio ray: {t_ray / total:.2f}")
        print(f"rss ratio 60s/5s: {rss['60s'] / rss['5s']:.2f}")
        builds, actors, lifetime, calls = batch_on_ray(folder, settings)
        print(f"model builds per run: {builds} ({actors} render actors, 4 clips)")
        print(f"render actors' lifetime inside swap: {lifetime:.2f}")
        print(f"render calls' time inside swap: {calls:.2f}")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 30.0)

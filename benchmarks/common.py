"""Shared helpers for the benchmark scripts (clip synthesis, timing, peak RSS of a child process)."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import skimage.data

from tests import synth

ROOT = Path(__file__).resolve().parent.parent


def face_clip(path: Path, seconds: float, size: tuple[int, int] = (854, 480), fps: int = 25) -> Path:
    """A clip of a real face moving over a textured background, with AAC audio. Frames are made on the fly."""
    if path.exists():
        return path
    patch = synth.face_patch(skimage.data.astronaut(), synth.ASTRONAUT_FACE_BOX)
    count = int(seconds * fps)
    plan = synth.smooth_path(count, *size, patch.shape[1])
    bg = synth.background(*size)
    return synth.write_clip(path, lambda i: synth.paste_patch(bg, patch, plan[i]), count=count, fps=fps, crf=20)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def run_cli(args: list[str]) -> tuple[float, int]:
    """Wall time and peak RSS (KiB) of `apple-video ARGS` in a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", "from cli import main; main()", *args], cwd=ROOT,
                            capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"apple-video {' '.join(args)} failed:\n{result.stderr}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return elapsed, max(peak, before)


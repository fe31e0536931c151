"""Frames per second of the whole `apple-video swap` (classic swapper, dlib detector, local executor) on a
480p clip with audio, process start-up included. Prints `classic fps: X.X` (goal >= 10 on a 2-core CPU)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from apple_video.media.video import probe
from benchmarks.common import ROOT, face_clip, run_cli


def main(seconds: float = 10.0) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        clip = face_clip(Path(tmp) / "clip480p.mp4", seconds=seconds)
        frames = probe(clip).frame_count
        source = ROOT / "examples" / "source.jpg"
        elapsed, _ = run_cli(["swap", str(source), str(clip), "-o", str(Path(tmp) / "out.mp4"), "--swapper", "classic"])
        out = probe(Path(tmp) / "out.mp4")
        assert out.frame_count == frames
        print(f"{frames} frames of 854x480 in {elapsed:.1f}s (start-up included)")
        print(f"classic fps: {frames / elapsed:.1f}")


if __name__ == "__main__":
    main()

"""The whole `apple-video swap` (classic swapper, dlib detector, local executor) on a 480p clip with audio, process
start-up included, against a plain PyAV transcode of the same clip measured in the same run; then where the time
goes, stage by stage, in one process.

Prints the per-stage table (ms per frame), `classic fps: X.X` and `classic/transcode time ratio: X.XX`
(goal <= 8; guard <= 12 on a 2-core CPU)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apple_video.engine.stages import Analyzer, Renderer  # noqa: E402
from apple_video.faces.select import select_targets  # noqa: E402
from apple_video.faces.sources import source_faces  # noqa: E402
from apple_video.media.video import EncodeSettings, VideoWriter, decode_frames, probe  # noqa: E402
from apple_video.settings import SwapSettings  # noqa: E402
from apple_video.swappers.classic import ClassicSwapper  # noqa: E402
from benchmarks.common import ROOT, face_clip, run_cli, timed  # noqa: E402
from benchmarks.transcode import plain  # noqa: E402

STAGES = ("decode", "detection", "landmark fit/refit", "identity embedding", "tracking", "crops", "swap landmarks",
          "warp", "masks", "blend", "paste", "encode")


class StageClock:
    """Seconds spent per named stage; `wrap` times every call of a bound method under a stage's name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner: object, method: str, stage: str) -> None:
        inner: Callable = getattr(owner, method)

        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start

        setattr(owner, method, timed_call)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds


def profile(clip: Path, source: Path, settings: SwapSettings) -> tuple[dict[str, float], int]:
    """Seconds per stage of one in-process pass over `clip`, each stage run on its own (no overlap)."""
    clock = StageClock()
    info = probe(clip)
    decode_time, decoded = timed(lambda: [(f.index, f.pts, f.rgb) for f in decode_frames(info, ahead=0)])
    clock.add("decode", decode_time)
    analyzer = Analyzer(settings)
    detector = analyzer.detector
    clock.wrap(detector, "_face", "landmark fit/refit")
    clock.wrap(detector, "embed", "identity embedding")
    analyze_time, found = timed(analyzer.analyze, decoded)
    clock.add("detection", analyze_time - clock.seconds["landmark fit/refit"] - clock.seconds["identity embedding"])
    detections = [found[i] for i in range(len(decoded))]
    select_time, selection = timed(select_targets, detections, info.fps, settings.selector, settings.tracking)
    clock.add("tracking", select_time)
    swapper = ClassicSwapper()
    sources = source_faces([np.asarray(Image.open(source).convert("RGB"))], [source.name], detector, swapper.crop_size)
    renderer = Renderer(settings, swapper, sources)
    for method, stage in (("target_points", "swap landmarks"), ("warp", "warp"), ("masks", "masks"),
                          ("blend", "blend")):
        clock.wrap(swapper, method, stage)
    clock.wrap(renderer, "prepare", "crops")
    clock.wrap(renderer, "finish", "paste")
    rendered = []
    for start in range(0, len(decoded), renderer.batch_size):
        group = renderer.prepare(decoded[start : start + renderer.batch_size], selection.targets)
        rendered.extend(renderer.finish(group, renderer.swap(group))[0])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with VideoWriter(Path(tmp) / "out.mp4", info, EncodeSettings(), tag=False) as writer:
            for _, pts, rgb, _ in rendered:
                writer.write(rgb, pts)
        clock.add("encode", time.perf_counter() - start)
    return dict(clock.seconds), len(decoded)


def main(seconds: float = 10.0, stages: bool = True) -> None:
    source = ROOT / "examples" / "source.jpg"
    with tempfile.TemporaryDirectory() as tmp:
        clip = face_clip(Path(tmp) / "clip480p.mp4", seconds=seconds)
        frames = probe(clip).frame_count
        transcode, _ = timed(plain, clip, Path(tmp) / "plain.mp4")
        elapsed, _ = run_cli(["swap", str(source), str(clip), "-o", str(Path(tmp) / "out.mp4"), "--swapper", "classic"])
        out = probe(Path(tmp) / "out.mp4")
        assert out.frame_count == frames
        if stages:
            spent, count = profile(clip, source, SwapSettings(swapper="classic"))
            print(f"where the time goes (one process, stages run one after another), ms per frame over {count} frames:")
            for stage in STAGES:
                print(f"  {stage:<20} {1000 * spent.get(stage, 0.0) / count:7.2f}")
            print(f"  {'total':<20} {1000 * sum(spent.values()) / count:7.2f}")
        print(f"{frames} frames of 854x480 in {elapsed:.1f}s (start-up included); plain PyAV transcode {transcode:.2f}s")
        print(f"classic fps: {frames / elapsed:.1f}")
        print(f"classic/transcode time ratio: {elapsed / transcode:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length (25 fps)")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage profile")
    arguments = parser.parse_args()
    main(arguments.seconds, not arguments.no_stages)

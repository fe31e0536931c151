"""The whole `apple-video swap` (classic swapper, dlib detector, local executor) on a 480p clip with audio, process
start-up included, against a plain PyAV transcode of the same clip measured in the same run; then where the time
goes, stage by stage, in one process.

Prints the per-stage table (ms per frame), `classic fps: X.X` and `classic/transcode time ratio: X.XX`
(goal <= 8; guard <= 12 on a 2-core CPU)."""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from apple_video.engine.analysis import Analyzer
from apple_video.engine.factories import model_files
from apple_video.engine.render import Renderer
from apple_video.faces.detect import create_detector
from apple_video.faces.select import select_targets
from apple_video.faces.sources import source_faces
from apple_video.faces.track import frame_signature
from apple_video.media.video import EncodeSettings, VideoWriter, decode_frames, probe
from apple_video.settings import SwapSettings
from apple_video.swappers.classic import ClassicSwapper
from benchmarks.common import ROOT, face_clip, run_cli, timed
from benchmarks.transcode import plain

STAGES = ("decode", "cut thumbnails", "detection", "landmark fit/refit", "identity embedding", "tracking", "crops",
          "swap landmarks", "warp", "masks", "blend", "paste", "encode")


class StageClock:
    """CPU seconds of this process per named stage (robust to other load on the machine: the stages run one after
    another); `wrap` times every call of a bound method under a stage's name, a call nested in another of the same
    stage counted once."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._active: set[str] = set()

    def wrap(self, owner: object, method: str, stage: str) -> None:
        inner: Callable = getattr(owner, method)

        def timed_call(*args, **kwargs):
            if stage in self._active:
                return inner(*args, **kwargs)
            self._active.add(stage)
            start = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[stage] += time.process_time() - start
                self._active.discard(stage)

        setattr(owner, method, timed_call)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds


def cpu_timed(fn, *args):
    start = time.process_time()
    result = fn(*args)
    return time.process_time() - start, result


def profile(clip: Path, source: Path, settings: SwapSettings) -> tuple[dict[str, float], int]:
    """CPU seconds per stage of one in-process pass over `clip`, each stage run on its own (no overlap)."""
    clock = StageClock()
    info = probe(clip)
    decode_time, decoded = cpu_timed(lambda: [(f.index, f.pts, f.rgb) for f in decode_frames(info, ahead=0)])
    clock.add("decode", decode_time)
    clock.add("cut thumbnails", cpu_timed(lambda: [frame_signature(rgb) for _, _, rgb in decoded])[0])
    files = model_files(settings)  # as a job's planner resolves them: the detector's, parser's, occlusion net's
    analyzer = Analyzer(create_detector(settings.detector, files, announce=False))
    detector = analyzer.detector
    for method in ("_points", "_fit_in"):  # every landmark fit: the first in a box, the refits in their windows
        clock.wrap(detector, method, "landmark fit/refit")
    clock.wrap(detector, "embed", "identity embedding")
    analyze_time, found = cpu_timed(analyzer.analyze, decoded)
    clock.add("detection", analyze_time - clock.seconds["landmark fit/refit"] - clock.seconds["identity embedding"])
    detections = [found[i] for i in range(len(decoded))]
    select_time, selection = cpu_timed(select_targets, detections, info.fps, settings.selector, settings.tracking)
    clock.add("tracking", select_time)
    swapper = ClassicSwapper()
    sources = source_faces([np.asarray(Image.open(source).convert("RGB"))], [source.name],
                           create_detector(settings.detector, files, announce=False), swapper.crop_size)
    renderer = Renderer(settings, swapper, sources, files)
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
        start = time.process_time()
        with VideoWriter(Path(tmp) / "out.mp4", info, EncodeSettings(), tag=False) as writer:
            for _, pts, rgb, _ in rendered:
                writer.write(rgb, pts)
        clock.add("encode", time.process_time() - start)
    return dict(clock.seconds), len(decoded)


def main(seconds: float = 10.0, stages: bool = True) -> None:
    source = ROOT / "examples" / "source.jpg"
    with tempfile.TemporaryDirectory() as tmp:
        clip = face_clip(Path(tmp) / "clip480p.mp4", seconds=seconds)
        frames = probe(clip).frame_count
        cpu_start = time.process_time()
        transcode, _ = timed(plain, clip, Path(tmp) / "plain.mp4")
        transcode_cpu = time.process_time() - cpu_start
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        elapsed, _ = run_cli(["swap", str(source), str(clip), "-o", str(Path(tmp) / "out.mp4"), "--swapper", "classic"])
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        classic_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
        out = probe(Path(tmp) / "out.mp4")
        assert out.frame_count == frames
        if stages:
            spent, count = profile(clip, source, SwapSettings(swapper="classic"))
            print(f"where the time goes (CPU ms per frame over {count} frames, one process, stages one after another):")
            for stage in STAGES:
                print(f"  {stage:<20} {1000 * spent.get(stage, 0.0) / count:7.2f}")
            print(f"  {'total':<20} {1000 * sum(spent.values()) / count:7.2f}")
        print(f"{frames} frames of 854x480 in {elapsed:.1f}s (start-up included); plain PyAV transcode {transcode:.2f}s")
        print(f"classic fps: {frames / elapsed:.1f}")
        print(f"CPU seconds: classic {classic_cpu:.1f}, plain transcode {transcode_cpu:.2f}")
        print(f"classic/transcode CPU time ratio: {classic_cpu / transcode_cpu:.2f} (less sensitive to other load)")
        print(f"classic/transcode time ratio: {elapsed / transcode:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length (25 fps)")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage profile")
    arguments = parser.parse_args()
    main(arguments.seconds, not arguments.no_stages)

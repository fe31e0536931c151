"""`apple-video eval` on a clip against the swap's own analyze stage on the same clip.

Swaps a synthetic 720p clip (a real face moving over a textured background) with the classic swapper, takes
the analyze stage's seconds from the job summary, then times `evaluate_clip` on (source, clip, swapped clip).
Goal: `eval/analyze time ratio` <= 1.5 (eval detects the original once, fits the swapped face's landmarks in
the same box and embeds identities every 8th frame, as the analyze stage does).

    python -m benchmarks.eval [--seconds 10] [--width 1280 --height 720]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from apple_video.engine.run import swap_video
from apple_video.evaluate.clip import evaluate_clip
from apple_video.settings import DetectorSettings, EvalSettings, SwapSettings
from benchmarks.common import ROOT, face_clip

SOURCE = ROOT / "examples" / "source.jpg"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        clip = face_clip(Path(tmp) / "clip.mp4", args.seconds, (args.width, args.height))
        swapped = Path(tmp) / "swapped.mp4"
        summary = swap_video([SOURCE], clip, swapped, SwapSettings(swapper="classic", detector=DetectorSettings("dlib")))
        analyze = summary.seconds["analyze"]
        start = time.perf_counter()
        report = evaluate_clip(SOURCE, clip, swapped, EvalSettings())
        evaluation = time.perf_counter() - start
    print(f"clip {args.seconds:g} s {args.width}x{args.height}: {summary.frames} frames, "
          f"{report.counts['frames_with_face']} with a face")
    print("swap stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in summary.seconds.items()))
    print(f"eval {evaluation:.1f}s (frames {report.seconds['frames']:.1f}s, similarity scale "
          f"{report.seconds['total'] - report.seconds['frames']:.1f}s)")
    m = report.metrics
    print(f"id similarity {m['id_similarity']:.3f} (variance {m['id_variance']:.5f}), pose error "
          f"{m['pose_error_deg']:.2f} deg mean / {m['pose_error_deg_median']:.2f} median "
          f"({report.counts['frames_with_pose']} frames with a pose; {report.models['pose_error_deg']}), "
          f"flicker ratio {m['flicker_ratio']:.2f}")
    print(f"FF++ 10 frames: id {m['ff10_id_similarity']:.3f}, pose {m['ff10_pose_error_deg']:.2f} deg, "
          f"expression {m['ff10_expression_error_pct']:.2f} % IOD")
    print(f"eval/analyze time ratio: {evaluation / analyze:.2f}")


if __name__ == "__main__":
    main()

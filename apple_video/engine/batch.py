"""Many clips, one job each: per-clip failures are reported and the other clips finish."""

from __future__ import annotations

import logging
from pathlib import Path

from apple_video.engine.run import Summary, swap_any
from apple_video.errors import AppleVideoError, InputError
from apple_video.media.video import is_video_path
from apple_video.settings import SwapSettings

logger = logging.getLogger(__name__)


def list_clips(target: Path) -> list[Path]:
    if target.is_dir():
        clips = sorted(p for p in target.iterdir() if p.is_file() and is_video_path(p))
    else:
        lines = [line.strip() for line in target.read_text().splitlines()]
        clips = [Path(line) if Path(line).is_absolute() else target.parent / line for line in lines if line and not line.startswith("#")]
    if not clips:
        raise InputError(f"no video clips in {target}")
    return clips


def swap_batch(sources: list[Path], target: Path, output_dir: Path, settings: SwapSettings) -> list[Summary]:
    output_dir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for clip in list_clips(target):
        output = output_dir / clip.name
        if output.exists() and not settings.force:
            summaries.append(Summary(str(clip), str(output), status="skipped", error="output exists (use --force)"))
            continue
        try:
            summaries.append(swap_any(sources, clip, output, settings))  # locked, disk errors as one line
        except AppleVideoError as error:
            logger.error("%s: %s", clip, error)
            summaries.append(Summary(str(clip), str(output), status="failed", error=str(error)))
    return summaries

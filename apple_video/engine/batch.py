"""Many clips, one job each, on one pool of workers: per-clip failures are reported and the other clips finish."""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from pathlib import Path

from apple_video.engine.factories import EngineFactories
from apple_video.engine.run import BatchResult, ClipPlan, ClipRequest, Summary, run_clips, video_plan
from apple_video.errors import InputError
from apple_video.media.video import CONTAINER_CODECS, check_encoder, default_codec_for, is_video_path
from apple_video.settings import EncodeSettings, SwapSettings

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


def encode_for(encode: EncodeSettings, output: Path) -> EncodeSettings:
    """The batch's encoder where the clip's container holds it, else the container's own (VP9 for .webm) at the
    same quality, as a single clip's default would be."""
    allowed = CONTAINER_CODECS.get(output.suffix.lower())
    if allowed is None or encode.codec in allowed:
        return encode
    codec = default_codec_for(output)
    if codec == encode.codec:
        return encode
    quality = (51 - encode.crf) / 0.51 if encode.codec != "libvpx-vp9" else (63 - encode.crf) / 0.63
    crf = round(63 - quality * 0.63) if codec == "libvpx-vp9" else round(51 - quality * 0.51)
    logger.info("%s: %s cannot hold %s video; encoding it with %s", output.name, output.suffix, encode.codec, codec)
    return replace(encode, codec=codec, crf=crf)


def _clip_plan(sources: list[Path], clip: Path, output: Path, settings: SwapSettings) -> ClipPlan:
    encode = encode_for(settings.encode, output)
    check_encoder(encode, output.suffix.lower())  # a clip whose container refuses the encoder fails alone
    return video_plan(sources, clip, output, replace(settings, encode=encode))


def run_batch(sources: list[Path], target: Path, output_dir: Path, settings: SwapSettings,
              factories: EngineFactories | None = None) -> BatchResult:
    """The batch with the workers' own accounts (model builds, busy time)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    clips = list_clips(target)
    earlier: dict[int, Summary] = {}
    requests: list[ClipRequest] = []
    for position, clip in enumerate(clips):
        output = output_dir / clip.name
        if output.exists() and not settings.force:
            earlier[position] = Summary(str(clip), str(output), done_earlier=True)
            continue
        plan = functools.partial(_clip_plan, sources, clip, output, settings)
        requests.append(ClipRequest(clip, output, plan, lock=True))
    result = run_clips(requests, settings, factories=factories) if requests else BatchResult([])
    ran = iter(result.summaries)
    result.summaries = [earlier[i] if i in earlier else next(ran) for i in range(len(clips))]
    return result


def swap_batch(sources: list[Path], target: Path, output_dir: Path, settings: SwapSettings,
               factories: EngineFactories | None = None) -> list[Summary]:
    return run_batch(sources, target, output_dir, settings, factories).summaries

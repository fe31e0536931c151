"""Each clip's plan, made on the driver before any model is built: the clip opened and probed (a video's last
group of pictures decoded, a frame folder's headers read), its own settings (encoder for its container, detector
angles for its rotation) and where its job state lives. A bad clip is refused here, in one line."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from apple_video.engine.layout import job_dir_for
from apple_video.faces.detect import FaceDetector
from apple_video.faces.sources import source_faces
from apple_video.faces.types import SourceFace
from apple_video.media.images import frame_size, list_frames, read_image
from apple_video.media.video import (
    CONTAINER_CODECS,
    VideoInfo,
    announce_output,
    check_encoder,
    decode_frames,
    default_codec_for,
    probe,
    trim,
)
from apple_video.settings import DetectorSettings, EncodeSettings, SwapSettings
from apple_video.swappers.factory import crop_size_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipPlan:
    """One clip of a run as planned: what it reads, what it writes, with which settings, how many frames.
    Workers never see it (they get data, not paths)."""

    kind: Literal["video", "folder"]
    input: Path
    output: Path
    settings: SwapSettings  # the clip's own (its encoder follows its container, its angles its rotation)
    sources: tuple[Path, ...]
    faces: tuple[SourceFace, ...] = field(compare=False)  # the source photos' faces, found once in planning
    frame_count: int
    fps: float
    keyframes: tuple[int, ...] = (0,)
    info: VideoInfo | None = None  # a video's
    frame_paths: tuple[Path, ...] = ()  # a frame folder's
    cuts: frozenset[int] = frozenset()  # frames no face track crosses (where a frame folder's frame size changes)

    @property
    def job_dir(self) -> Path:
        return job_dir_for(self.output)

    def chunk_file(self, chunk: int) -> Path:
        return self.job_dir / "chunks" / f"chunk_{chunk:05d}{self.output.suffix}"

    def analysis_file(self, chunk: int) -> Path:
        return self.job_dir / "analysis" / f"chunk_{chunk:05d}.json"


def source_detector(settings: SwapSettings, detector: Callable[[DetectorSettings], FaceDetector]) -> FaceDetector:
    """Source photos are searched upright first, whatever angles the target needs."""
    angles = (0, *(a for a in settings.detector.angles if a != 0))
    return detector(replace(settings.detector, angles=angles))


def load_sources(paths: Sequence[Path], detector: FaceDetector, crop_size: int) -> list[SourceFace]:
    """Read the source photos and align their largest face at the swapper's crop size."""
    return source_faces([read_image(p).rgb for p in paths], [str(p) for p in paths], detector, crop_size)


def find_source_faces(paths: Sequence[Path], settings: SwapSettings,
                      detector: Callable[[DetectorSettings], FaceDetector]) -> tuple[SourceFace, ...]:
    """Each source photo read and its face found, once per run (a photo without a face is refused here)."""
    return tuple(load_sources(paths, source_detector(settings, detector), crop_size_for(settings)))


def probe_video(path: Path) -> VideoInfo:
    """Open and probe a clip, and decode its last group of pictures: a file that is not a video, has no video
    stream or cannot be decoded to its end fails now, not after the models are loaded."""
    info = probe(path)
    last_key = max(k for k in info.keyframes if k < info.frame_count)
    for _ in decode_frames(info, last_key, info.frame_count, ahead=0):
        pass
    return info


def _crf_range(codec: str) -> int:
    return 63 if codec == "libvpx-vp9" else 51


def crf_for(codec: str, quality: float) -> int:
    """--output-video-quality 0..100 -> the encoder's CRF, like FaceFusion (80 -> CRF 10 on x264)."""
    top = _crf_range(codec)
    return round(top - quality * top / 100)


def quality_of(codec: str, crf: int) -> float:
    """The quality a CRF was made from (the inverse of `crf_for`)."""
    top = _crf_range(codec)
    return (top - crf) / (top / 100)


def video_encode(encoder: str | None, quality: int, preset: str, output: Path) -> EncodeSettings:
    codec = encoder or default_codec_for(output)
    return EncodeSettings(codec=codec, crf=crf_for(codec, quality), preset=preset)


def encode_for(encode: EncodeSettings, output: Path) -> EncodeSettings:
    """The run's encoder where the clip's container holds it, else the container's own (VP9 for .webm) at the
    same quality, as a single clip's default would be."""
    allowed = CONTAINER_CODECS.get(output.suffix.lower())
    if allowed is None or encode.codec in allowed:
        return encode
    codec = default_codec_for(output)
    if codec == encode.codec:
        return encode
    logger.info("%s: %s cannot hold %s video; encoding it with %s", output.name, output.suffix, encode.codec, codec)
    return replace(encode, codec=codec, crf=crf_for(codec, quality_of(encode.codec, encode.crf)))


def for_rotation(settings: SwapSettings, rotation: int) -> SwapSettings:
    """A clip with display rotation may have been filmed upright in its stored picture: unless angles were chosen,
    also look at the picture turned back by the rotation (only on frames where upright finds nothing)."""
    if not rotation or settings.detector.angles != (0,):
        return settings
    back = (360 - rotation) % 360
    logger.debug("display rotation %d: also looking for faces turned by %d degrees", rotation, back)
    return replace(settings, detector=replace(settings.detector, angles=(0, back)))


def plan_video(sources: tuple[Path, ...], faces: tuple[SourceFace, ...], clip: Path, output: Path,
               settings: SwapSettings) -> ClipPlan:
    info = probe_video(clip)
    if settings.trimmed:
        info = trim(info, settings.trim_start, settings.trim_end)
    encode = encode_for(settings.encode, output)
    if encode != settings.encode:
        check_encoder(encode, output.suffix.lower())  # a clip whose container refuses the encoder fails alone
    clip_settings = replace(for_rotation(settings, info.rotation), encode=encode)
    announce_output(info, encode, output, settings.trimmed)
    return ClipPlan("video", clip, output, clip_settings, sources, faces, info.frame_count, float(info.fps),
                    info.keyframes, info=info)


def plan_folder(sources: tuple[Path, ...], faces: tuple[SourceFace, ...], folder: Path, output: Path,
                settings: SwapSettings, fps: float = 25.0) -> ClipPlan:
    """A frame folder: every frame's header read (an empty, broken or pixel-bomb frame is refused before any
    work); no face track crosses a change of frame size (another geometry)."""
    paths = tuple(list_frames(folder))
    sizes = [frame_size(path) for path in paths]
    cuts = frozenset(i for i in range(1, len(sizes)) if sizes[i] != sizes[i - 1])
    return ClipPlan("folder", folder, output, settings, sources, faces, len(paths), fps, (0,), frame_paths=paths,
                    cuts=cuts)

"""Video on PyAV: probe, chunked streaming decode, encode with the input's timestamps, concat + audio remux."""

from __future__ import annotations

import contextlib
import heapq
import io
import logging
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from apple_video.errors import DecodeError, InputError, OutputError
from apple_video.media.metadata import synthetic_tag
from apple_video.media.paths import atomic_write, check_input
from apple_video.prefetch import prefetch
from apple_video.settings import EncodeSettings

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".mxf", ".wmv", ".gif")
VIDEO_CODECS = ("libx264", "libx264rgb", "libx265", "libvpx-vp9", "h264_nvenc", "hevc_nvenc", "ffv1", "prores_ks")
_AUDIO_OK = {
    ".mp4": {"aac", "mp3", "ac3", "eac3", "alac", "flac", "opus"},
    ".m4v": {"aac", "mp3", "ac3", "eac3", "alac"},
    ".mov": {"aac", "mp3", "ac3", "eac3", "alac", "pcm_s16le", "pcm_s24le", "pcm_s16be", "pcm_f32le"},
    ".webm": {"opus", "vorbis"},
}


@dataclass(frozen=True)
class AudioInfo:
    index: int
    codec: str
    sample_rate: int
    channels: int


@dataclass(frozen=True)
class HdrInfo:
    """HDR static metadata of a clip, in the units x264/x265 take: chromaticities in 0.00002, luminance in 0.0001
    cd/m2 (mastering display: G, B, R, white point, max and min luminance), light level in cd/m2 (MaxCLL, MaxFALL)."""

    mastering: tuple[int, ...] | None = None  # gx, gy, bx, by, rx, ry, wx, wy, max_l, min_l
    light: tuple[int, int] | None = None

    def encoder_params(self, codec: str) -> str:
        """The metadata as x264-params / x265-params (the two name the same things differently)."""
        x265 = codec == "libx265"
        parts = []
        if self.mastering:
            gx, gy, bx, by, rx, ry, wx, wy, high, low = self.mastering
            name = "master-display" if x265 else "mastering-display"
            parts.append(f"{name}=G({gx},{gy})B({bx},{by})R({rx},{ry})WP({wx},{wy})L({high},{low})")
        if self.light:
            parts.append(f"{'max-cll' if x265 else 'cll'}={self.light[0]},{self.light[1]}")
        if x265:
            parts.append("hdr10-opt=0:repeat-headers=1")
        return ":".join(parts)


def _rational(num: int, den: int, unit: float) -> int:
    return round(num / den / unit) if den else 0


def hdr_of(frame: av.VideoFrame) -> HdrInfo | None:
    """Mastering display and content light level side data of a decoded frame (FFmpeg's structs, read raw)."""
    mastering = light = None
    for item in frame.side_data:
        raw = bytes(item)
        if item.type == av.sidedata.sidedata.Type.MASTERING_DISPLAY_METADATA and len(raw) >= 88:
            values = struct.unpack("<20i2i", raw[:88])
            rationals = list(zip(values[0:20:2], values[1:20:2], strict=True))
            (rx, ry), (gx, gy), (bx, by), (wx, wy) = [rationals[i:i + 2] for i in (0, 2, 4, 6)]
            if values[20]:  # has_primaries
                chroma = [_rational(*r, 0.00002) for r in (gx, gy, bx, by, rx, ry, wx, wy)]
                luminance = [_rational(*rationals[9], 0.0001), _rational(*rationals[8], 0.0001)]
                mastering = (*chroma, *luminance)
        elif item.type == av.sidedata.sidedata.Type.CONTENT_LIGHT_LEVEL and len(raw) >= 8:
            light = struct.unpack("<2I", raw[:8])
    return HdrInfo(mastering, light) if mastering or light else None


def pixel_depth(pix_fmt: str) -> int:
    try:
        return max(c.bits for c in av.VideoFormat(pix_fmt).components)
    except (ValueError, TypeError):
        return 8


def chroma_of(pix_fmt: str) -> str:
    if pix_fmt.startswith(("rgb", "bgr", "gbr", "argb", "abgr", "rgba", "bgra", "yuv444", "yuva444", "yuvj444")):
        return "444"
    return "422" if "422" in pix_fmt else "420"


@dataclass(frozen=True)
class VideoInfo:
    """What the engine needs to know about a clip. `pts` are the presentation timestamps in display order."""

    path: Path
    width: int
    height: int
    codec: str
    pix_fmt: str
    time_base: Fraction
    fps: Fraction
    pts: tuple[int, ...]
    keyframes: tuple[int, ...]  # frame indices that start a GOP
    rotation: int
    audio: tuple[AudioInfo, ...]
    color: dict = field(default_factory=dict)
    depth: int = 8  # bits per component of the stored pixels
    chroma: str = "420"  # "420", "422" or "444" (RGB formats count as 444)
    hdr: HdrInfo | None = None
    field_order: int = 0  # FFmpeg's AVFieldOrder of an interlaced clip (2 top first, 3 bottom first...), else 0
    last_duration: int = 0  # the last frame's duration in time_base units (0: unknown, one frame at fps)

    @property
    def frame_count(self) -> int:
        return len(self.pts)

    @property
    def interlaced(self) -> bool:
        return self.field_order > 1

    @property
    def frame_duration(self) -> int:
        """The last frame's duration in time_base units: the container's own, else one frame at the clip's rate."""
        if self.last_duration > 0:
            return self.last_duration
        if len(self.pts) > 1 and not self.fps:
            return self.pts[-1] - self.pts[-2]
        return max(1, round(1 / (self.fps * self.time_base))) if self.fps else 1

    @property
    def duration(self) -> float:
        if not self.pts:
            return 0.0
        return float((self.pts[-1] - self.pts[0] + self.frame_duration) * self.time_base)

    @property
    def vfr(self) -> bool:
        if len(self.pts) < 3:
            return False
        deltas = np.diff(np.asarray(self.pts, dtype=np.int64))
        return int(deltas.max()) - int(deltas.min()) > max(1, int(deltas.min()) // 100)


def is_video_path(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _open(path: Path) -> av.container.InputContainer:
    check_input(path)
    try:
        return av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as error:
        raise InputError(f"cannot open {path}: not a readable video ({error.__class__.__name__})") from None


def _color_of(stream: av.video.stream.VideoStream) -> dict:
    ctx = stream.codec_context
    color = {}
    for name in ("color_range", "colorspace", "color_primaries", "color_trc"):
        value = getattr(ctx, name, None)
        if value is not None:
            color[name] = int(value)
    return color


def is_cover(stream: av.stream.Stream) -> bool:
    """A still picture stored as a video stream (cover art, a Matroska image attachment)."""
    return bool(int(stream.disposition) & int(av.stream.Disposition.attached_pic))


def main_video(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The clip's moving picture: the first video stream that is not cover art."""
    for stream in container.streams.video:
        if not is_cover(stream):
            return stream
    raise InputError(f"no video stream in {container.name}")


def probe(path: str | Path) -> VideoInfo:
    """Demux every video packet (no decoding) for an exact frame count, timestamps and keyframes."""
    path = Path(path)
    with _open(path) as container:
        if not container.streams.video:
            raise InputError(f"no video stream in {path}")
        stream = main_video(container)
        ctx = stream.codec_context
        time_base = stream.time_base or Fraction(1, 90000)
        entries: list[tuple[int, bool, int]] = []
        try:
            for packet in container.demux(stream):
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is None or packet.size == 0:
                    continue
                entries.append((ts, packet.is_keyframe, packet.duration or 0))
        except av.FFmpegError as error:
            logger.warning("demuxing %s stopped early: %s", path, error)
        if not entries:
            raise InputError(f"no decodable video frames in {path}")
        entries.sort()
        declared = stream.frames or 0
        if declared > len(entries):
            logger.warning("%s is truncated: its header lists %d frames but only %d are there; the output will end "
                           "at frame %d", path, declared, len(entries), len(entries))
        pts = tuple(ts for ts, _, _ in entries)
        keyframes = tuple(i for i, (_, key, _) in enumerate(entries) if key) or (0,)
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        first = _first_frame(container, stream)
        audio = tuple(
            AudioInfo(a.index, a.codec_context.name, a.codec_context.sample_rate or 0, a.codec_context.channels or 0)
            for a in container.streams.audio
        )
        pix_fmt = ctx.pix_fmt or "yuv420p"
        field_order = int(getattr(ctx, "field_order", 0) or 0)  # FFmpeg's AVFieldOrder: 0 unknown, 1 progressive
        return VideoInfo(
            path=path,
            width=ctx.width,
            height=ctx.height,
            codec=ctx.name,
            pix_fmt=pix_fmt,
            time_base=Fraction(time_base),
            fps=Fraction(rate),
            pts=pts,
            keyframes=keyframes,
            rotation=first.rotation,
            audio=audio,
            color=_color_of(stream),
            depth=pixel_depth(pix_fmt),
            chroma=chroma_of(pix_fmt),
            hdr=first.hdr,
            field_order=field_order if field_order > 1 else (2 if first.interlaced else 0),
            last_duration=entries[-1][2],
        )


@dataclass(frozen=True)
class _FirstFrame:
    rotation: int = 0  # display rotation in degrees (counter-clockwise)
    hdr: HdrInfo | None = None
    interlaced: bool = False


def _first_frame(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> _FirstFrame:
    """What only a decoded frame tells: display rotation, HDR side data, interlacing."""
    try:
        container.seek(0)
        for frame in container.decode(stream):
            return _FirstFrame(int(round(frame.rotation or 0)) % 360, hdr_of(frame), bool(frame.interlaced_frame))
    except av.FFmpegError:
        return _FirstFrame()
    return _FirstFrame()


@dataclass
class DecodedFrame:
    index: int
    pts: int
    rgb: np.ndarray  # uint8, stored orientation; see `to_display`
    deep: np.ndarray | None = None  # uint16 RGB of a clip deeper than 8 bits (rgb is its rounded 8-bit view)


def trim(info: VideoInfo, start: int | None, end: int | None) -> VideoInfo:
    """The clip restricted to frames [start, end) (frame numbers in display order)."""
    first = max(0, start or 0)
    last = min(info.frame_count, end if end is not None else info.frame_count)
    if first >= last:
        raise InputError(f"trim range [{first}, {last}) holds no frames (the clip has {info.frame_count})")
    keys = tuple(k - first for k in info.keyframes if first <= k < last)
    duration = info.pts[last] - info.pts[last - 1] if last < info.frame_count else info.last_duration
    return replace(info, pts=info.pts[first:last], keyframes=keys or (0,), last_duration=duration)


def to_display(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """Rotate stored pixels to how they are shown (display matrix: counter-clockwise degrees)."""
    k = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


def from_display(rgb: np.ndarray, rotation: int) -> np.ndarray:
    k = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, -k)) if k else rgb


def decode_frames(info: VideoInfo, start: int = 0, stop: int | None = None, ahead: int = 8) -> Iterator[DecodedFrame]:
    """Yield frames [start, stop) in display order, seeking to the keyframe before `start`. Bounded memory:
    at most `ahead` frames are decoded ahead of the consumer (0: no decoding thread)."""
    frames = _decode_frames(info, start, stop)
    return prefetch(frames, ahead) if ahead > 0 else frames


def _decode_frames(info: VideoInfo, start: int, stop: int | None) -> Iterator[DecodedFrame]:
    stop = info.frame_count if stop is None else min(stop, info.frame_count)
    if start >= stop:
        return
    stop_pts = info.pts[stop] if stop < info.frame_count else None
    with _open(info.path) as container:
        stream = main_video(container)
        stream.thread_type = "AUTO"

        def frames() -> Iterator[av.VideoFrame]:
            if start > 0:
                container.seek(info.pts[start], stream=stream, backward=True, any_frame=False)
            for packet in container.demux(stream):
                yield from packet.decode()

        yield from _window(frames(), info.path.name, start, info.pts[start:stop], stop_pts, info.depth)


def _window(frames: Iterator[av.VideoFrame], name: str, start: int, pts: Sequence[int], stop_pts: int | None,
            depth: int) -> Iterator[DecodedFrame]:
    """The frames numbered [start, start + len(pts)) out of a decoder that began at the keyframe before them: the
    one place where decoding is windowed, so a file and a chunk's packets fail with the same words."""
    stop = start + len(pts)
    index = start
    try:
        for frame in frames:
            stamp = frame.pts if frame.pts is not None else pts[min(index - start, len(pts) - 1)]
            if stamp < pts[0]:
                continue
            if stop_pts is not None and stamp >= stop_pts:
                return
            yield _decoded(frame, index, stamp, depth)
            index += 1
            if index >= stop:
                return
    except av.FFmpegError as error:
        raise DecodeError(f"{name}: decoding failed at frame {index}: {error}") from None
    if index < stop:
        raise DecodeError(f"{name}: video is truncated or corrupt: decoding stopped at frame {index} of {stop}")


def _decoded(frame: av.VideoFrame, index: int, stamp: int, depth: int) -> DecodedFrame:
    """8-bit RGB for face work; past 8 bits also the 16-bit RGB the output is composited and encoded from."""
    if depth <= 8:
        # rows of widths like 854 are padded by FFmpeg: hand out contiguous arrays (dlib, OpenCV need them)
        return DecodedFrame(index, stamp, np.ascontiguousarray(frame.to_ndarray(format="rgb24")))
    deep = np.ascontiguousarray(frame.to_ndarray(format="rgb48le"))
    return DecodedFrame(index, stamp, narrow(deep), deep)


def narrow(deep: np.ndarray) -> np.ndarray:
    """16-bit RGB to 8-bit, rounded (65535 -> 255)."""
    return ((deep.astype(np.uint32) + 128) // 257).astype(np.uint8)


def deepen(deep: np.ndarray | None, rgb: np.ndarray) -> np.ndarray:
    """The rendered 8-bit frame `rgb` back at the decoded frame's 16 bits: each pixel is the decoded one plus what
    the render changed of its 8-bit view, so pixels outside the face mask come back exactly as decoded and the
    mask's feathered edge keeps the background's fine levels. None (an 8-bit clip): `rgb` as it is."""
    if deep is None:
        return rgb
    change = rgb.astype(np.int32) - narrow(deep)
    if not change.any():
        return deep
    return np.clip(deep.astype(np.int32) + change * 257, 0, 65535).astype(np.uint16)


X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")
# video codecs each container can hold (the others are refused before any work)
CONTAINER_CODECS = {
    ".webm": ("libvpx-vp9",),
    ".mp4": ("libx264", "libx265", "libvpx-vp9", "h264_nvenc", "hevc_nvenc"),
    ".m4v": ("libx264", "libx265", "h264_nvenc", "hevc_nvenc"),
    ".mov": ("libx264", "libx264rgb", "libx265", "h264_nvenc", "hevc_nvenc", "ffv1", "prores_ks"),
}
GIF_REFUSAL = ("GIF output is not supported: a GIF holds 256 colours per frame, which bands every swapped face; "
               "write .mp4 or .webm (and make the GIF from it if you need one)")


def check_encoder(settings: EncodeSettings, suffix: str) -> None:
    """Refuse an encoder, preset or container pairing that cannot work, by encoding a tiny clip with it."""
    if suffix == ".gif":
        raise OutputError(GIF_REFUSAL)
    allowed = CONTAINER_CODECS.get(suffix)
    if allowed is not None and settings.codec not in allowed:
        raise OutputError(f"{suffix} files cannot hold {settings.codec} video: use --output-video-encoder "
                          f"{' or '.join(c for c in allowed if 'nvenc' not in c)}, or another file type")
    if settings.codec in ("libx264", "libx264rgb", "libx265") and settings.preset not in X264_PRESETS:
        raise OutputError(f"unknown --output-video-preset '{settings.preset}' for {settings.codec}: "
                          f"choose one of {', '.join(X264_PRESETS)}")
    if settings.codec not in av.codecs_available:
        raise OutputError(f"video encoder '{settings.codec}' is not in this PyAV build; use libx264")
    width, height = 256, 144
    try:
        with tempfile.TemporaryDirectory() as tmp:
            probe_file = Path(tmp) / f"probe{suffix}"
            with av.open(str(probe_file), "w") as out:
                stream = out.add_stream(settings.codec, rate=25)
                stream.width, stream.height = width, height
                stream.pix_fmt = _pix_fmt(settings, width, height)
                stream.options = _codec_options(settings)
                for i in range(2):
                    frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 40 * i, np.uint8), format="rgb24")
                    frame.pts = i
                    out.mux(stream.encode(frame))
                out.mux(stream.encode(None))
            with av.open(str(probe_file)) as back:  # the chunks are read back when joined: a decoder must exist
                next(back.decode(video=0))
    except (av.FFmpegError, ValueError, OSError, StopIteration) as error:
        hint = " (NVENC needs an NVIDIA GPU and driver)" if "nvenc" in settings.codec else ""
        raise OutputError(f"the video encoder {settings.codec} does not work here{hint}: "
                          f"{str(error).splitlines()[0] if str(error) else error.__class__.__name__}; "
                          f"try --output-video-encoder libx264") from None


def default_codec_for(path: Path) -> str:
    return "libvpx-vp9" if path.suffix.lower() == ".webm" else "libx264"


_LOSSLESS_RGB = {8: "bgr0", 10: "gbrp10le", 12: "gbrp12le"}


def _supports(codec: str, pix_fmt: str) -> bool:
    try:
        formats = av.codec.Codec(codec, "w").video_formats or ()
    except (ValueError, av.FFmpegError):
        return False
    return pix_fmt in {f.name for f in formats}


def _pix_fmt(settings: EncodeSettings, width: int, height: int, depth: int = 8, chroma: str = "420") -> str:
    """The encoder's pixel format: the input's depth and chroma layout where the encoder (in this build) holds
    them, else the nearest it does (4:4:4 for odd sizes, which 4:2:x cannot hold)."""
    if settings.pix_fmt:
        return settings.pix_fmt
    codec = settings.codec
    if codec == "libx264rgb":
        return "rgb24"
    if codec == "ffv1":
        return _LOSSLESS_RGB.get(depth, "gbrp16le") if depth > 8 else "bgr0"
    if codec in ("h264_nvenc", "hevc_nvenc"):
        return "yuv420p"
    layout = "444" if width % 2 or height % 2 else chroma
    if codec == "prores_ks":
        return "yuv444p10le" if layout == "444" else "yuv422p10le"
    for bits in (b for b in (12, 10) if b <= depth):
        if _supports(codec, f"yuv{layout}p{bits}le"):
            return f"yuv{layout}p{bits}le"
    return f"yuv{layout}p" if _supports(codec, f"yuv{layout}p") else "yuv420p"


def output_pix_fmt(settings: EncodeSettings, info: VideoInfo) -> str:
    return _pix_fmt(settings, info.width, info.height, info.depth, info.chroma)


_HDR_WRITERS = ("libx264", "libx265")


def what_is_lost(settings: EncodeSettings, info: VideoInfo) -> str | None:
    """One sentence on what the chosen encoder cannot hold of the input's picture (depth, chroma, HDR metadata)."""
    pix_fmt = output_pix_fmt(settings, info)
    depth, chroma = pixel_depth(pix_fmt), chroma_of(pix_fmt)
    lost = []
    if depth < info.depth:
        lost.append(f"{info.depth}-bit pixels are cut to {depth} bits")
    if int(chroma) < int(info.chroma):
        lost.append(f"{info.chroma[0]}:{info.chroma[1]}:{info.chroma[2]} chroma becomes "
                    f"{chroma[0]}:{chroma[1]}:{chroma[2]}")
    if info.hdr is not None and settings.codec not in _HDR_WRITERS:
        lost.append("the HDR mastering-display and light-level metadata are dropped")
    if not lost:
        return None
    return (f"{settings.codec} ({pix_fmt}) cannot hold all of {info.path.name}: {'; '.join(lost)} "
            f"(the default encoder keeps them)")


def _codec_options(settings: EncodeSettings, info: VideoInfo | None = None) -> dict[str, str]:
    crf = str(settings.crf)
    hdr = info.hdr if info is not None else None
    interlaced = info is not None and info.interlaced
    if settings.codec in ("libx264", "libx264rgb"):
        params = [hdr.encoder_params("libx264")] if hdr else []
        if interlaced:
            params.append("bff=1" if info.field_order in (3, 5) else "tff=1")
        options = {"crf": crf, "preset": settings.preset}
        return {**options, "x264-params": ":".join(params)} if params else options
    if settings.codec == "libx265":
        params = ["log-level=error", *([hdr.encoder_params("libx265")] if hdr else [])]
        return {"crf": crf, "preset": settings.preset, "x265-params": ":".join(params)}
    if settings.codec == "libvpx-vp9":
        return {"crf": crf, "b": "0", "deadline": "good", "cpu-used": "8", "row-mt": "1"}
    if settings.codec in ("h264_nvenc", "hevc_nvenc"):
        return {"cq": crf, "preset": "p4"}
    if settings.codec == "prores_ks":
        return {"profile": "4" if output_pix_fmt(settings, info).startswith("yuv444") else "3"} if info else {}
    return {}


class VideoWriter:
    """Encode RGB frames at given pts (the input's), keeping time base, rotation and colour metadata."""

    def __init__(self, path: Path | io.BytesIO, info: VideoInfo, settings: EncodeSettings, tag: bool = True,
                 container_format: str | None = None) -> None:
        self.path = path
        if settings.codec not in av.codecs_available:
            raise OutputError(f"video encoder '{settings.codec}' is not available in this PyAV build")
        target = path if isinstance(path, io.BytesIO) else str(path)
        self.container = av.open(target, "w", format=container_format)
        stream = self.container.add_stream(settings.codec, rate=info.fps)
        stream.width, stream.height = info.width, info.height
        stream.pix_fmt = output_pix_fmt(settings, info)
        stream.time_base = info.time_base
        stream.codec_context.time_base = info.time_base
        stream.codec_context.max_b_frames = 0  # chunks are concatenated: keep dts == pts
        stream.options = _codec_options(settings, info)
        tags = {**info.color, **({"field_order": info.field_order} if info.interlaced else {})}
        for name, value in tags.items():
            with contextlib.suppress(AttributeError, TypeError, ValueError):
                setattr(stream.codec_context, name, value)
        if info.rotation:
            stream.set_display_rotation(info.rotation)
        if tag:
            self.container.metadata["comment"] = synthetic_tag()
        self.stream = stream
        self.time_base = info.time_base

    def write(self, rgb: np.ndarray, pts: int) -> None:
        """`rgb`: uint8, or uint16 for a clip deeper than 8 bits."""
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb48le" if rgb.dtype == np.uint16 else "rgb24")
        frame.pts = pts
        frame.time_base = self.time_base
        self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        self.container.mux(self.stream.encode(None))
        self.container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.container.close()


def _packets(path: Path, kind: str, out_streams: dict[int, av.stream.Stream],
             window: tuple[float, float] | None = None) -> Iterator[tuple[float, int, av.Packet]]:
    """Packets of one input file, tagged with their time in seconds for merging. With a `window`
    (start, end) in seconds, only packets starting inside it are kept, shifted so that `start` becomes 0."""
    with av.open(str(path)) as container:
        streams = [s for s in container.streams if s.type == kind]
        for packet in container.demux(streams):
            if packet.dts is None or packet.size == 0:
                continue
            target = out_streams.get(packet.stream.index)
            if target is None:
                continue
            seconds = float(packet.dts * packet.time_base)
            if window is not None:
                start_s, end_s = window
                if not start_s <= float((packet.pts if packet.pts is not None else packet.dts) * packet.time_base) < end_s:
                    continue
                shift = int(round(start_s / packet.time_base))
                packet.dts -= shift
                if packet.pts is not None:
                    packet.pts -= shift
                seconds -= start_s
            packet.stream = target
            yield seconds, id(target), packet


def _add_audio_streams(out: av.container.OutputContainer, source: Path, suffix: str) -> tuple[dict, list]:
    """Copy audio streams when the container allows the codec; the rest are re-encoded to AAC/Opus."""
    copies: dict[int, av.stream.Stream] = {}
    reencode: list[tuple[int, av.stream.Stream]] = []
    allowed = _AUDIO_OK.get(suffix)
    with av.open(str(source)) as container:
        for stream in container.streams.audio:
            if allowed is None or stream.codec_context.name in allowed:
                copies[stream.index] = out.add_stream_from_template(stream)
            else:
                codec = "libopus" if suffix == ".webm" else "aac"
                rate = 48000 if codec == "libopus" else (stream.codec_context.sample_rate or 48000)  # opus: 48 kHz family
                new = out.add_stream(codec, rate=rate)
                new.layout = stream.codec_context.layout.name if stream.codec_context.layout else "stereo"
                reencode.append((stream.index, new))
    return copies, reencode


def _reencoded_audio(source: Path, targets: list[tuple[int, av.stream.Stream]],
                     window: tuple[float, float] | None = None) -> Iterator[tuple[float, int, av.Packet]]:
    if not targets:
        return
    by_index = dict(targets)
    with av.open(str(source)) as container:
        streams = [s for s in container.streams.audio if s.index in by_index]
        for packet in container.demux(streams):
            if packet.size == 0:  # demuxer flush packets; the encoders are flushed once, by the caller
                continue
            target = by_index[packet.stream.index]
            for frame in packet.decode():
                if window is not None and frame.pts is not None:
                    at = float(frame.pts * frame.time_base)
                    if not window[0] <= at < window[1]:
                        continue
                    frame.pts -= int(round(window[0] / frame.time_base))
                for out_packet in target.encode(frame):  # PyAV resamples; keeping pts keeps the timing
                    if out_packet.dts is None:
                        continue
                    yield float(out_packet.dts * out_packet.time_base), id(target), out_packet


_TEXT_SUBTITLES = ("subrip", "srt", "text", "mov_text")
_MP4_LIKE = (".mp4", ".m4v", ".mov")


@dataclass(frozen=True)
class SideStream:
    """An input stream that is not the swapped video or audio, and what the output does with it."""

    index: int
    kind: str  # "subtitle", "attachment", "cover", "timecode", "data"
    codec: str
    label: str  # for messages: "subtitle #2 (subrip, eng)"
    action: str  # "copy", "mov_text"/"subrip" (converted), "attach" (a Matroska attachment), "tag" (timecode), "drop"
    timecode: str | None = None


def _action(kind: str, codec: str, suffix: str, trimmed: bool) -> str:
    if kind == "timecode":  # the muxer writes its own timecode track (mov, mp4) or tag (mkv) from the video's tag
        return "tag" if suffix in (*_MP4_LIKE, ".mkv") and not trimmed else "drop"
    if suffix == ".mkv":
        return {"subtitle": "copy" if codec != "mov_text" else "subrip", "attachment": "attach",
                "cover": "attach"}.get(kind, "drop")
    if suffix in _MP4_LIKE:
        if kind == "subtitle" and codec in _TEXT_SUBTITLES:
            return "copy" if codec == "mov_text" else "mov_text"
        if kind == "cover" and codec in ("mjpeg", "png"):
            return "copy"
    if suffix == ".webm" and kind == "subtitle" and codec == "webvtt":
        return "copy"
    return "drop"


def side_streams(path: Path, suffix: str, trimmed: bool = False) -> list[SideStream]:
    """Subtitles, attachments, cover art, timecode and data tracks of `path`, each with what a `suffix` output keeps
    of it (a timecode starts at the clip's first frame: a trimmed output drops it)."""
    found = []
    with _open(path) as container:
        for stream in container.streams:
            if stream.type == "audio" or (stream.type == "video" and not is_cover(stream)):
                continue
            kind = "cover" if stream.type == "video" else stream.type
            timecode = stream.metadata.get("timecode") if kind == "data" else None
            if timecode:
                kind = "timecode"
            elif kind not in ("subtitle", "attachment", "cover"):
                kind = "data"
            codec = stream.codec_context.name if stream.type != "attachment" and stream.codec_context else ""
            name = stream.metadata.get("filename") or stream.metadata.get("language") or ""
            details = ", ".join(x for x in (codec, name) if x)
            label = f"{kind} #{stream.index}{f' ({details})' if details else ''}"
            found.append(SideStream(stream.index, kind, codec, label, _action(kind, codec, suffix, trimmed), timecode))
    return found


def announce_output(info: VideoInfo, settings: EncodeSettings, output: Path, trimmed: bool = False) -> None:
    """Before work: one warning line for what the output cannot keep of the input, one note for interlacing."""
    dropped = [s.label for s in side_streams(info.path, output.suffix.lower(), trimmed) if s.action == "drop"]
    if dropped:
        logger.warning("%s cannot hold %s of %s: %s dropped", output.suffix, ", ".join(dropped), info.path.name,
                       "it is" if len(dropped) == 1 else "they are")
    lost = what_is_lost(settings, info)
    if lost:
        logger.warning("%s", lost)
    if info.interlaced:
        logger.warning("%s is interlaced: the output is encoded and flagged interlaced too (deinterlace it "
                       "beforehand for progressive output)", info.path.name)


def _converted(packet: av.Packet, to: str) -> bytes:
    """A SubRip packet as mov_text (the UTF-8 text after its 16-bit length), or a mov_text one as SubRip."""
    data = bytes(packet)
    if to == "mov_text":
        return struct.pack(">H", len(data)) + data
    (length,) = struct.unpack(">H", data[:2]) if len(data) >= 2 else (0,)
    return data[2 : 2 + length]


def _add_side_streams(out: av.container.OutputContainer, video: av.stream.Stream, source: Path, suffix: str,
                      trimmed: bool) -> dict[int, tuple]:
    """Add the kept side streams to `out`; returns input index -> (output stream, conversion) for those whose
    packets follow (attachments are written whole, now; a timecode becomes the output video's tag)."""
    plan = {s.index: s for s in side_streams(source, suffix, trimmed) if s.action != "drop"}
    for side in plan.values():
        if side.action == "tag":
            video.metadata["timecode"] = side.timecode
    targets: dict[int, tuple] = {}
    with av.open(str(source)) as container:
        for stream in container.streams:
            side = plan.get(stream.index)
            if side is None:
                continue
            if side.action == "tag":
                continue
            if side.action == "attach":
                data = stream.data if side.kind == "attachment" else _first_packet(container, stream)
                picture = {"mjpeg": ("cover.jpg", "image/jpeg"), "png": ("cover.png", "image/png")}.get(side.codec)
                name, mimetype = picture or (f"attachment-{stream.index}", "application/octet-stream")
                out.add_attachment(stream.metadata.get("filename") or name, stream.metadata.get("mimetype") or mimetype,
                                   bytes(data or b""))
            elif side.action in ("mov_text", "subrip"):
                target = out.add_mux_stream(side.action)
                target.time_base = stream.time_base
                targets[stream.index] = (target, side.action)
            else:
                target = out.add_stream_from_template(stream)
                if side.kind == "cover":
                    target.disposition = av.stream.Disposition.attached_pic
                targets[stream.index] = (target, None)
            if side.kind == "subtitle" and stream.language and stream.index in targets:
                targets[stream.index][0].metadata["language"] = stream.language
    return targets


def _first_packet(container: av.container.InputContainer, stream: av.stream.Stream) -> bytes:
    for packet in container.demux(stream):
        if packet.size:
            return bytes(packet)
    return b""


def _side_packets(source: Path, targets: dict[int, tuple], window: tuple[float, float] | None,
                  ) -> Iterator[tuple[float, int, av.Packet]]:
    """Packets of the kept subtitle and cover streams, in the trim window (shifted like the audio)."""
    if not targets:
        return
    with av.open(str(source)) as container:
        streams = [s for s in container.streams if s.index in targets]
        for packet in container.demux(streams):
            if packet.size == 0:
                continue
            target, convert = targets[packet.stream.index]
            stamp = packet.pts if packet.pts is not None else packet.dts
            cover = is_cover(packet.stream)
            if stamp is None and not cover:
                continue
            seconds = float((stamp or 0) * packet.time_base)
            if convert:
                data = _converted(packet, convert)
                if convert == "subrip" and not data:
                    continue  # mp4's empty samples between two lines: no event in Matroska
                out = av.Packet(data)
                out.pts, out.dts, out.duration = packet.pts, packet.dts, packet.duration
            else:
                out = packet
            out.time_base = packet.time_base
            if cover:
                out.pts = out.dts = 0
                seconds = 0.0
            elif window is not None:
                if not window[0] <= seconds < window[1]:
                    continue
                shift = int(round(window[0] / packet.time_base))
                out.pts -= shift
                out.dts = out.pts
                seconds -= window[0]
            out.stream = target
            yield seconds, id(target), out


def _restamped(packets: Iterator[tuple[float, int, av.Packet]], pts: Sequence[int], time_base: Fraction,
               last_duration: int) -> Iterator[tuple[float, int, av.Packet]]:
    """Give video packets the input's exact timestamps and durations (containers round them, e.g. mp4 edit lists;
    a chunk's own durations are in its container's time base)."""
    durations = [*np.diff(np.asarray(pts, dtype=np.int64)).tolist(), last_duration]
    for (_, key, packet), stamp, duration in zip(packets, pts, durations, strict=False):
        packet.pts = packet.dts = stamp
        packet.duration = int(duration)
        packet.time_base = time_base
        yield float(stamp * time_base), key, packet


def concat_chunks(
    chunks: list[Path], output: Path, audio_source: Path | None, pts: Sequence[int], time_base: Fraction, rotation: int = 0,
    audio_window: tuple[float, float] | None = None, rate: Fraction | None = None, last_duration: int | None = None,
    source: Path | None = None,
) -> Path:
    """Join chunk files into `output` (temp file + rename), muxing the audio of `audio_source` beside them and the
    subtitles, attachments and cover art of `source` that the output's container holds.

    Chunks hold frames in display order without B-frames, so packet k is frame k and gets `pts[k]`; the last frame
    lasts `last_duration` (default: as long as the one before it, or one frame at `rate`).
    """
    if not chunks:
        raise OutputError("nothing to write: no chunks were rendered")
    if last_duration is None:
        last_duration = pts[-1] - pts[-2] if len(pts) > 1 else max(1, round(1 / ((rate or 25) * time_base)))
    suffix = output.suffix.lower()
    with atomic_write(output) as tmp:
        with av.open(str(chunks[0])) as first, av.open(str(tmp), "w") as out:
            video_in = first.streams.video[0]
            video_out = out.add_stream_from_template(video_in)
            video_out.time_base = time_base
            if rate:  # Matroska derives the frame rate it reports from this; else from its 1 ms time base
                video_out.codec_context.framerate = rate
            if rotation:
                video_out.set_display_rotation(rotation)
            copies, reencode = _add_audio_streams(out, audio_source, suffix) if audio_source else ({}, [])
            sides = _add_side_streams(out, video_out, source, suffix, audio_window is not None) if source else {}
            out.metadata["comment"] = synthetic_tag()
            video_packets = _restamped(
                (p for chunk in chunks for p in _packets(chunk, "video", {video_in.index: video_out})), pts, time_base,
                last_duration,
            )
            audio_packets = _packets(audio_source, "audio", copies, audio_window) if copies else iter(())
            encoded = _reencoded_audio(audio_source, reencode, audio_window) if reencode else iter(())
            side_packets = _side_packets(source, sides, audio_window) if sides else iter(())
            for _, _, packet in heapq.merge(video_packets, audio_packets, encoded, side_packets, key=lambda item: item[0]):
                out.mux(packet)
            for _, stream in reencode:
                out.mux(stream.encode(None))
    return output


# --- chunks as data: what a worker of another machine receives and returns (no path of the driver is opened) ---


@dataclass(frozen=True)
class StreamParams:
    """What a decoder needs to read a stream's packets without its file."""

    codec: str
    extradata: bytes | None
    width: int
    height: int
    pix_fmt: str
    time_base: Fraction


@dataclass(frozen=True)
class ChunkPackets:
    """The compressed packets of frames [start, stop), in decode order from the keyframe before `start` on."""

    name: str  # the clip's name, for messages only
    params: StreamParams
    packets: tuple[tuple[bytes, int | None, int | None], ...]  # (data, pts, dts)
    start: int
    pts: tuple[int, ...]  # the chunk's display timestamps (pts[0] starts it)
    stop_pts: int | None  # the first timestamp after the chunk, None at the end of the clip

    @property
    def stop(self) -> int:
        return self.start + len(self.pts)


REORDER_LIMIT = 32  # packets past the chunk's end after which no frame of the chunk can follow (H.264 reorders <= 16)


def read_packets(info: VideoInfo, start: int, stop: int) -> ChunkPackets:
    """Demux (no decoding) the packets a decoder needs for frames [start, stop): from the keyframe at or before
    `start` to the next keyframe after the chunk (with the open-GOP frames that lean on it) or a reorder window."""
    stop = min(stop, info.frame_count)
    start_pts = info.pts[start]
    stop_pts = info.pts[stop] if stop < info.frame_count else None
    packets: list[tuple[bytes, int | None, int | None]] = []
    with _open(info.path) as container:
        stream = main_video(container)
        ctx = stream.codec_context
        params = StreamParams(ctx.name, bytes(ctx.extradata) if ctx.extradata else None, ctx.width, ctx.height,
                              ctx.pix_fmt or "yuv420p", Fraction(stream.time_base or info.time_base))
        try:
            if start > 0:
                container.seek(start_pts, stream=stream, backward=True, any_frame=False)
            boundary, past = None, 0
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                ts = packet.pts if packet.pts is not None else packet.dts
                if stop_pts is not None and ts is not None:
                    if boundary is not None and ts > boundary:
                        break
                    if boundary is None and ts >= stop_pts:
                        if packet.is_keyframe:
                            boundary = ts
                        else:
                            past += 1
                            if past > REORDER_LIMIT:
                                break
                packets.append((bytes(packet), packet.pts, packet.dts))
        except av.FFmpegError as error:
            raise DecodeError(f"{info.path.name}: reading packets failed near frame {start}: {error}") from None
    return ChunkPackets(info.path.name, params, tuple(packets), start, tuple(info.pts[start:stop]), stop_pts)


def decode_packets(chunk: ChunkPackets) -> Iterator[DecodedFrame]:
    """Frames [chunk.start, chunk.stop) decoded from the chunk's packets in memory, as `decode_frames` gives them."""
    params = chunk.params
    ctx = av.CodecContext.create(params.codec, "r")
    if params.extradata:
        ctx.extradata = params.extradata
    ctx.width, ctx.height = params.width, params.height
    with contextlib.suppress(AttributeError, TypeError, ValueError):
        ctx.pix_fmt = params.pix_fmt
    # no frame threads: a worker decodes one chunk, and a frame-threaded context left mid-stream can hang on close

    def frames() -> Iterator[av.VideoFrame]:
        for data, pts, dts in chunk.packets:
            packet = av.Packet(data)
            packet.pts, packet.dts, packet.time_base = pts, dts, params.time_base
            yield from ctx.decode(packet)
        yield from ctx.decode(None)  # flush: the frames the decoder still holds

    return _window(frames(), chunk.name, chunk.start, chunk.pts, chunk.stop_pts, pixel_depth(params.pix_fmt))


_MUXERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi",
           ".ts": "mpegts", ".mpg": "mpeg", ".mpeg": "mpeg", ".mxf": "mxf", ".wmv": "asf", ".gif": "gif"}


def encode_chunk(frames: Iterator[tuple[np.ndarray, int]], info: VideoInfo, settings: EncodeSettings,
                 suffix: str) -> bytes:
    """Encode (stored-orientation rgb, pts) frames into one chunk container in memory, in `suffix`'s format (the
    output's: `concat_chunks` copies its stream parameters). The driver writes these bytes as the chunk file."""
    buffer = io.BytesIO()
    writer = VideoWriter(buffer, info, settings, tag=False, container_format=_MUXERS.get(suffix.lower(), "matroska"))
    with writer:
        for rgb, pts in frames:
            writer.write(rgb, pts)
    return buffer.getvalue()

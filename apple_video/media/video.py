"""Video on PyAV: probe, chunked streaming decode, encode with the input's timestamps, concat + audio remux."""

from __future__ import annotations

import contextlib
import heapq
import io
import logging
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
VIDEO_CODECS = ("libx264", "libx264rgb", "libx265", "libvpx-vp9", "h264_nvenc", "hevc_nvenc", "ffv1")
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

    @property
    def frame_count(self) -> int:
        return len(self.pts)

    @property
    def duration(self) -> float:
        if not self.pts:
            return 0.0
        step = 1 / float(self.fps) if self.fps else 0.0
        return float((self.pts[-1] - self.pts[0]) * self.time_base) + step

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


def probe(path: str | Path) -> VideoInfo:
    """Demux every video packet (no decoding) for an exact frame count, timestamps and keyframes."""
    path = Path(path)
    with _open(path) as container:
        if not container.streams.video:
            raise InputError(f"no video stream in {path}")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        time_base = stream.time_base or Fraction(1, 90000)
        entries: list[tuple[int, bool]] = []
        try:
            for packet in container.demux(stream):
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is None or packet.size == 0:
                    continue
                entries.append((ts, packet.is_keyframe))
        except av.FFmpegError as error:
            logger.warning("demuxing %s stopped early: %s", path, error)
        if not entries:
            raise InputError(f"no decodable video frames in {path}")
        entries.sort()
        declared = stream.frames or 0
        if declared > len(entries):
            logger.warning("%s is truncated: its header lists %d frames but only %d are there; the output will end "
                           "at frame %d", path, declared, len(entries), len(entries))
        pts = tuple(ts for ts, _ in entries)
        keyframes = tuple(i for i, (_, key) in enumerate(entries) if key) or (0,)
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        rotation = _first_frame_rotation(container)
        audio = tuple(
            AudioInfo(a.index, a.codec_context.name, a.codec_context.sample_rate or 0, a.codec_context.channels or 0)
            for a in container.streams.audio
        )
        return VideoInfo(
            path=path,
            width=ctx.width,
            height=ctx.height,
            codec=ctx.name,
            pix_fmt=ctx.pix_fmt or "yuv420p",
            time_base=Fraction(time_base),
            fps=Fraction(rate),
            pts=pts,
            keyframes=keyframes,
            rotation=rotation,
            audio=audio,
            color=_color_of(stream),
        )


def _first_frame_rotation(container: av.container.InputContainer) -> int:
    """Display rotation in degrees (counter-clockwise), read off the first decoded frame."""
    try:
        container.seek(0)
        for frame in container.decode(video=0):
            return int(round(frame.rotation or 0)) % 360
    except av.FFmpegError:
        return 0
    return 0


@dataclass
class DecodedFrame:
    index: int
    pts: int
    rgb: np.ndarray  # stored orientation; see `to_display`


def trim(info: VideoInfo, start: int | None, end: int | None) -> VideoInfo:
    """The clip restricted to frames [start, end) (frame numbers in display order)."""
    first = max(0, start or 0)
    last = min(info.frame_count, end if end is not None else info.frame_count)
    if first >= last:
        raise InputError(f"trim range [{first}, {last}) holds no frames (the clip has {info.frame_count})")
    keys = tuple(k - first for k in info.keyframes if first <= k < last)
    return replace(info, pts=info.pts[first:last], keyframes=keys or (0,))


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
    start_pts = info.pts[start]
    stop_pts = info.pts[stop] if stop < info.frame_count else None
    index = start
    with _open(info.path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            if start > 0:
                container.seek(start_pts, stream=stream, backward=True, any_frame=False)
            for packet in container.demux(stream):
                for frame in packet.decode():
                    pts = frame.pts if frame.pts is not None else info.pts[min(index, stop - 1)]
                    if pts < start_pts:
                        continue
                    if stop_pts is not None and pts >= stop_pts:
                        return
                    # rows of widths like 854 are padded by FFmpeg: hand out contiguous arrays (dlib, OpenCV need them)
                    yield DecodedFrame(index, pts, np.ascontiguousarray(frame.to_ndarray(format="rgb24")))
                    index += 1
                    if index >= stop:
                        return
        except av.FFmpegError as error:
            raise DecodeError(f"{info.path}: decoding failed at frame {index}: {error}") from None
    if index < stop:
        raise DecodeError(f"{info.path}: video is truncated or corrupt: decoding stopped at frame {index} of {stop}")


X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")
# video codecs each container can hold (the others are refused before any work)
CONTAINER_CODECS = {
    ".webm": ("libvpx-vp9",),
    ".mp4": ("libx264", "libx265", "libvpx-vp9", "h264_nvenc", "hevc_nvenc"),
    ".m4v": ("libx264", "libx265", "h264_nvenc", "hevc_nvenc"),
    ".mov": ("libx264", "libx264rgb", "libx265", "h264_nvenc", "hevc_nvenc", "ffv1"),
}


def check_encoder(settings: EncodeSettings, suffix: str) -> None:
    """Refuse an encoder, preset or container pairing that cannot work, by encoding a tiny clip with it."""
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


def _pix_fmt(settings: EncodeSettings, width: int, height: int) -> str:
    if settings.pix_fmt:
        return settings.pix_fmt
    if settings.codec == "libx264rgb":
        return "rgb24"
    if settings.codec == "ffv1":
        return "bgr0"
    odd = width % 2 or height % 2
    if settings.codec in ("h264_nvenc", "hevc_nvenc", "libsvtav1"):
        return "yuv420p"
    return "yuv444p" if odd else "yuv420p"


def _codec_options(settings: EncodeSettings) -> dict[str, str]:
    crf = str(settings.crf)
    if settings.codec in ("libx264", "libx264rgb"):
        return {"crf": crf, "preset": settings.preset}
    if settings.codec == "libx265":
        return {"crf": crf, "preset": settings.preset, "x265-params": "log-level=error"}
    if settings.codec == "libvpx-vp9":
        return {"crf": crf, "b": "0", "deadline": "good", "cpu-used": "8", "row-mt": "1"}
    if settings.codec == "libsvtav1":
        return {"crf": crf, "preset": "10"}
    if settings.codec in ("h264_nvenc", "hevc_nvenc"):
        return {"cq": crf, "preset": "p4"}
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
        stream.pix_fmt = _pix_fmt(settings, info.width, info.height)
        stream.time_base = info.time_base
        stream.codec_context.time_base = info.time_base
        stream.codec_context.max_b_frames = 0  # chunks are concatenated: keep dts == pts
        stream.options = _codec_options(settings)
        for name, value in info.color.items():
            try:
                setattr(stream.codec_context, name, value)
            except (AttributeError, TypeError, ValueError):
                pass
        if info.rotation:
            stream.set_display_rotation(info.rotation)
        if tag:
            self.container.metadata["comment"] = synthetic_tag()
        self.stream = stream
        self.time_base = info.time_base

    def write(self, rgb: np.ndarray, pts: int) -> None:
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
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


def _restamped(packets: Iterator[tuple[float, int, av.Packet]], pts: Sequence[int], time_base: Fraction):
    """Give video packets the input's exact timestamps (containers round them, e.g. mp4 edit lists)."""
    for (_, key, packet), stamp in zip(packets, pts, strict=False):
        packet.pts = packet.dts = stamp
        packet.time_base = time_base
        yield float(stamp * time_base), key, packet


def concat_chunks(
    chunks: list[Path], output: Path, audio_source: Path | None, pts: Sequence[int], time_base: Fraction, rotation: int = 0,
    audio_window: tuple[float, float] | None = None, rate: Fraction | None = None,
) -> Path:
    """Join chunk files into `output` (temp file + rename), muxing the audio of `audio_source` beside them.

    Chunks hold frames in display order without B-frames, so packet k is frame k and gets `pts[k]`.
    """
    if not chunks:
        raise OutputError("nothing to write: no chunks were rendered")
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
            out.metadata["comment"] = synthetic_tag()
            video_packets = _restamped(
                (p for chunk in chunks for p in _packets(chunk, "video", {video_in.index: video_out})), pts, time_base
            )
            audio_packets = _packets(audio_source, "audio", copies, audio_window) if copies else iter(())
            encoded = _reencoded_audio(audio_source, reencode, audio_window) if reencode else iter(())
            for _, _, packet in heapq.merge(video_packets, audio_packets, encoded, key=lambda item: item[0]):
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
        stream = container.streams.video[0]
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
            raise DecodeError(f"{info.path}: reading packets failed near frame {start}: {error}", start) from None
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
    start_pts, stop = chunk.pts[0], chunk.stop
    index = chunk.start

    def packets() -> Iterator[av.Packet | None]:
        for data, pts, dts in chunk.packets:
            packet = av.Packet(data)
            packet.pts, packet.dts, packet.time_base = pts, dts, params.time_base
            yield packet
        yield None  # flush: the frames the decoder still holds

    try:
        for packet in packets():
            for frame in ctx.decode(packet):
                pts = frame.pts if frame.pts is not None else chunk.pts[min(index - chunk.start, len(chunk.pts) - 1)]
                if pts < start_pts:
                    continue
                if chunk.stop_pts is not None and pts >= chunk.stop_pts:
                    return
                yield DecodedFrame(index, pts, np.ascontiguousarray(frame.to_ndarray(format="rgb24")))
                index += 1
                if index >= stop:
                    return
    except av.FFmpegError as error:
        raise DecodeError(f"{chunk.name}: decoding failed at frame {index}: {error}", index) from None
    if index < stop:
        raise DecodeError(f"{chunk.name}: video is truncated or corrupt: decoding stopped at frame {index} of {stop}", index)


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

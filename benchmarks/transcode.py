"""Our chunked decode -> encode (+ audio remux) against a plain PyAV decode -> encode loop on the same clip.

Prints `transcode ratio: X.XX` (ours / plain; goal <= 1.1)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import av

from apple_video.engine.run import plan_chunks
from apple_video.media.video import EncodeSettings, VideoWriter, concat_chunks, decode_frames, probe
from apple_video.settings import SwapSettings
from benchmarks.common import face_clip, timed


def plain(src: Path, dst: Path) -> None:
    """The baseline: one PyAV loop, RGB frames through numpy as our pipeline sees them, audio copied."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        vin = inp.streams.video[0]
        vin.thread_type = "AUTO"
        vout = out.add_stream("libx264", rate=vin.average_rate)
        vout.width, vout.height, vout.pix_fmt = vin.codec_context.width, vin.codec_context.height, "yuv420p"
        vout.time_base = vin.time_base
        vout.options = {"crf": "18", "preset": "veryfast"}
        aout = {s.index: out.add_stream_from_template(s) for s in inp.streams.audio}
        for packet in inp.demux():
            if packet.stream.type == "audio":
                if packet.dts is not None:
                    packet.stream = aout[packet.stream.index]
                    out.mux(packet)
                continue
            for frame in packet.decode():
                rgb = frame.to_ndarray(format="rgb24")
                new = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                new.pts, new.time_base = frame.pts, frame.time_base
                out.mux(vout.encode(new))
        out.mux(vout.encode(None))


def ours(src: Path, dst: Path, chunk_frames: int = SwapSettings().chunk_frames) -> None:
    info = probe(src)
    settings = EncodeSettings()
    parts = []
    for k, (start, stop) in enumerate(plan_chunks(info.frame_count, info.keyframes, chunk_frames)):
        part = dst.with_name(f"{dst.stem}.{k:04d}{dst.suffix}")
        with VideoWriter(part, info, settings, tag=False) as writer:
            for frame in decode_frames(info, start, stop):
                writer.write(frame.rgb, frame.pts)
        parts.append(part)
    concat_chunks(parts, dst, src, info.pts, info.time_base, info.rotation)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clip = face_clip(folder / "clip.mp4", seconds=8)
        plain(clip, folder / "warm.mp4")  # warm caches
        t_plain = min(timed(plain, clip, folder / "plain.mp4")[0] for _ in range(2))
        t_ours = min(timed(ours, clip, folder / "ours.mp4")[0] for _ in range(2))
        assert probe(folder / "ours.mp4").frame_count == probe(clip).frame_count
        print(f"clip: {probe(clip).frame_count} frames 854x480; plain PyAV {t_plain:.2f}s, apple-video {t_ours:.2f}s")
        print(f"transcode ratio: {t_ours / t_plain:.2f}")


if __name__ == "__main__":
    main()

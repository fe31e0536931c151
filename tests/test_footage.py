"""Footage as it comes from cameras, phones, editors and the web, through the whole engine with the classic swapper:
10-bit HDR and ProRes 4:2:2 keep their depth, tags and side data; subtitles, fonts and covers travel; every frame
keeps its duration; mixed frame folders and hidden files; SIGTERM resumes like Ctrl-C."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from apple_video.engine.layout import job_dir_for
from apple_video.engine.run import swap_folder, swap_video
from apple_video.errors import OutputError
from apple_video.media.video import (
    EncodeSettings,
    VideoWriter,
    announce_output,
    check_encoder,
    concat_chunks,
    decode_frames,
    probe,
)
from apple_video.settings import SwapSettings
from tests import synth
from tests.jobs import wait_until_rendered

ROOT = Path(__file__).resolve().parent.parent
SIZE = (320, 240)
CLASSIC = SwapSettings(swapper="classic", chunk_frames=4)


def _faces(astronaut_patch: np.ndarray, count: int, size: tuple[int, int] = SIZE) -> list[np.ndarray]:
    width, height = size
    path = [synth.Placement(width / 2 + 4 * i, height / 2, 0.95) for i in range(count)]
    return synth.face_frames(astronaut_patch, size, path)


def _face_box(frame_size: tuple[int, int], count: int, grow: float = 1.35) -> tuple[slice, slice]:
    """Rows and columns that hold the face (its drift and the mask's reach included): the rest is background."""
    width, height = frame_size
    half = 0.95 * 198 * grow / 2  # the astronaut patch is ~198 px wide
    x0, x1 = int(width / 2 - half), int(width / 2 + 4 * count + half)
    y0, y1 = int(height / 2 - half), int(height / 2 + half)
    return slice(max(0, y0), y1), slice(max(0, x0), x1)


def _deep(info) -> list[np.ndarray]:
    return [f.deep for f in decode_frames(info, ahead=0)]


def _outside(frames: list[np.ndarray], box: tuple[slice, slice]) -> np.ndarray:
    stack = np.stack(frames).astype(np.int64)
    keep = np.ones(stack.shape[1:3], bool)
    keep[box] = False
    return stack[:, keep]


def _plain_reencode(info, settings: EncodeSettings, path: Path) -> Path:
    """The same clip through the same encoder with no swap: the loss any re-encode at that depth has."""
    with VideoWriter(path, info, settings, tag=False) as writer:
        for frame in decode_frames(info, ahead=0):
            writer.write(frame.deep, frame.pts)
    return path


# -- 1. depth and colour --


@pytest.mark.parametrize("transfer", ["hlg", "pq"])
def test_hdr_clip_comes_back_at_its_depth_with_tags_and_side_data(tmp_path: Path, source_photo: Path,
                                                                   astronaut_patch: np.ndarray, transfer: str) -> None:
    count = 6
    frames = [synth.deepen(f, i) for i, f in enumerate(_faces(astronaut_patch, count))]
    clip = synth.write_deep_clip(tmp_path / f"{transfer}.mp4", frames, transfer=transfer)
    source = probe(clip)
    assert source.depth == 10 and source.hdr is not None
    output = tmp_path / "out.mp4"
    summary = swap_video([source_photo], clip, output, CLASSIC)
    assert summary.faces_swapped == count
    result = probe(output)
    assert result.depth == 10 and result.pix_fmt == "yuv420p10le"
    assert result.color == source.color and result.color["color_trc"] == synth.TRANSFER[transfer]
    assert result.hdr == source.hdr
    assert result.hdr.light == synth.HDR_LIGHT

    plain = probe(_plain_reencode(source, CLASSIC.encode, tmp_path / "plain.mp4"))
    box = _face_box(SIZE, count)
    decoded = _outside(_deep(source), box)
    swapped_error = np.abs(_outside(_deep(result), box) - decoded).mean()
    plain_error = np.abs(_outside(_deep(plain), box) - decoded).mean()
    # same encoder, same depth: the swap adds nothing outside the face (a face changes the encoder's rate control
    # a little: 5 % of a re-encode's own error, far below one 8-bit step of 257)
    assert swapped_error <= plain_error * 1.05 + 1, (swapped_error, plain_error)


def test_outside_the_face_the_pixels_come_back_as_decoded(tmp_path: Path, source_photo: Path,
                                                          astronaut_patch: np.ndarray) -> None:
    """Lossless 10-bit output (FFV1): the background equals a plain FFV1 re-encode of the decoded frames, to the
    last bit; an 8-bit composite would be off by up to half an 8-bit step (128 of 65535) everywhere."""
    count = 4
    frames = [synth.deepen(f, i) for i, f in enumerate(_faces(astronaut_patch, count))]
    source = probe(synth.write_deep_clip(tmp_path / "hlg.mp4", frames))
    lossless = replace(CLASSIC, encode=EncodeSettings(codec="ffv1"))
    output = tmp_path / "out.mkv"
    swap_video([source_photo], source.path, output, lossless)
    plain = probe(_plain_reencode(source, lossless.encode, tmp_path / "plain.mkv"))
    result = probe(output)
    assert result.depth == plain.depth == 10
    box = _face_box(SIZE, count)
    swapped, reference = _outside(_deep(result), box), _outside(_deep(plain), box)
    assert np.array_equal(swapped, reference)
    assert not np.array_equal(reference % 257, np.zeros_like(reference))  # detail below the 8-bit step is there


def test_prores_422_10bit_stays_422_10bit(tmp_path: Path, source_photo: Path, astronaut_patch: np.ndarray) -> None:
    frames = [synth.deepen(f, i) for i, f in enumerate(_faces(astronaut_patch, 4))]
    clip = synth.write_deep_clip(tmp_path / "editor.mov", frames, codec="prores_ks", pix_fmt="yuv422p10le",
                                 transfer=None, hdr=False)
    source = probe(clip)
    assert (source.codec, source.depth, source.chroma) == ("prores", 10, "422")
    for codec, name in (("libx264", "h264"), ("prores_ks", "prores")):
        output = tmp_path / f"out-{codec}.mov"
        swap_video([source_photo], clip, output, replace(CLASSIC, encode=EncodeSettings(codec=codec)))
        result = probe(output)
        assert (result.codec, result.depth, result.chroma) == (name, 10, "422")
        assert result.pts == source.pts


def test_an_encoder_that_cannot_hold_the_depth_says_what_is_lost(tmp_path: Path, astronaut_patch: np.ndarray,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    frames = [synth.deepen(f) for f in _faces(astronaut_patch, 2)]
    info = probe(synth.write_deep_clip(tmp_path / "hlg.mp4", frames))
    with caplog.at_level(logging.WARNING):
        announce_output(info, EncodeSettings(codec="libvpx-vp9"), tmp_path / "out.webm")
    [line] = [r.getMessage() for r in caplog.records]
    assert "libvpx-vp9" in line and "10-bit pixels are cut to 8 bits" in line and "HDR" in line
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        announce_output(info, EncodeSettings(codec="libx264"), tmp_path / "out.mp4")
    assert not caplog.records


# -- 2. every other stream --


@pytest.fixture()
def extras_clip(tmp_path: Path, astronaut_patch: np.ndarray) -> Path:
    clip = synth.write_clip(tmp_path / "plain.mp4", _faces(astronaut_patch, 10), fps=10)
    return synth.with_side_streams(clip, tmp_path / "extras.mkv", tmp_path)


def _streams(path: Path) -> dict[str, list]:
    found: dict[str, list] = {"subtitle": [], "attachment": [], "cover": [], "audio": []}
    with av.open(str(path)) as container:
        for stream in container.streams:
            if stream.type == "attachment":
                found["attachment"].append((stream.name, bytes(stream.data)))
            elif stream.type == "video" and int(stream.disposition) & int(av.stream.Disposition.attached_pic):
                found["cover"].append(stream.codec_context.name)
            elif stream.type in found:
                found[stream.type].append(stream.codec_context.name)
        subtitles = [s for s in container.streams.subtitles]
        texts = [bytes(p) for p in container.demux(subtitles) if p.size] if subtitles else []
    found["texts"] = texts
    return found


def test_mkv_keeps_subtitles_fonts_and_cover(tmp_path: Path, source_photo: Path, extras_clip: Path) -> None:
    output = tmp_path / "out.mkv"
    swap_video([source_photo], extras_clip, output, CLASSIC)
    streams = _streams(output)
    assert streams["subtitle"] == ["srt"] and streams["audio"] == ["aac"]
    assert ("font.ttf", synth.FONT) in streams["attachment"]
    assert streams["cover"] == ["mjpeg"]
    assert streams["texts"] == [b"Hello there", b"Second line"]


def test_mp4_keeps_the_subtitle_and_names_what_it_drops(tmp_path: Path, source_photo: Path, extras_clip: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    output = tmp_path / "out.mp4"
    with caplog.at_level(logging.WARNING):
        swap_video([source_photo], extras_clip, output, CLASSIC)
    streams = _streams(output)
    assert streams["subtitle"] == ["mov_text"] and streams["cover"] == ["mjpeg"]
    shown = [t for t in streams["texts"] if t != b"\x00\x00"]  # mp4 fills the gaps between lines with empty samples
    assert shown == [b"\x00\x0bHello there", b"\x00\x0bSecond line"]
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 1 and "font.ttf" in dropped[0]


def _rewrap(source: Path, output: Path) -> Path:
    """The media layer alone (no swap): one chunk re-encoded and joined with the source's other streams."""
    info = probe(source)
    part = output.with_name(f"part{output.suffix}")
    with VideoWriter(part, info, EncodeSettings(), tag=False) as writer:
        for frame in decode_frames(info, ahead=0):
            writer.write(frame.rgb, frame.pts)
    return concat_chunks([part], output, source if info.audio else None, info.pts, info.time_base, source=source)


def test_mov_text_and_cover_come_back_into_matroska(tmp_path: Path, extras_clip: Path) -> None:
    mp4 = _rewrap(extras_clip, tmp_path / "a.mp4")
    mkv = _rewrap(mp4, tmp_path / "b.mkv")
    streams = _streams(mkv)
    assert streams["subtitle"] == ["srt"] and streams["cover"] == ["mjpeg"]
    assert streams["texts"] == [b"Hello there", b"Second line"]


# -- 3. frame timing --


def _timing(path: Path) -> tuple[list[float], float, Fraction]:
    """Frame start times, the end of the last frame (seconds) and the stream's average frame rate."""
    with av.open(str(path)) as container:
        stream = next(s for s in container.streams.video if not int(s.disposition) & 1024)
        packets = sorted((p.pts, p.duration) for p in container.demux(stream) if p.size)
        base = stream.time_base
        starts = [float((pts - packets[0][0]) * base) for pts, _ in packets]
        end = float((packets[-1][0] - packets[0][0] + packets[-1][1]) * base)
        return starts, end, stream.average_rate


def _run_timing(source: Path, output: Path, source_photo: Path, **trim: int) -> None:
    settings = replace(CLASSIC, allow_no_faces=True, **trim)
    swap_video([source_photo], source, output, settings)


@pytest.mark.parametrize("kind", ["mkv", "gif"])
def test_every_frame_keeps_its_duration(tmp_path: Path, source_photo: Path, kind: str) -> None:
    frames = [synth.background(160, 120, seed=i % 4) for i in range(20)]
    if kind == "gif":
        source = synth.write_gif(tmp_path / "web.gif", frames, delay_ms=80)
    else:
        source = synth.write_clip(tmp_path / "plain.mp4", frames, fps=25, audio_streams=0)
        mkv = tmp_path / "in.mkv"
        with av.open(str(source)) as src, av.open(str(mkv), "w") as out:
            stream = out.add_stream_from_template(src.streams.video[0])
            for packet in src.demux(src.streams.video[0]):
                if packet.size:
                    packet.stream = stream
                    out.mux(packet)
        source = mkv
    frame = 0.08 if kind == "gif" else 0.04
    starts, end, rate = _timing(source)
    assert abs(end - 20 * frame) < 1e-3
    output = tmp_path / "out.mp4"
    _run_timing(source, output, source_photo)
    out_starts, out_end, out_rate = _timing(output)
    assert np.allclose(out_starts, starts, atol=1e-3)
    assert abs(out_end - end) < 1e-3, (out_end, end)  # no inflated last frame
    assert abs(float(out_rate) - 1 / frame) < 0.05

    trimmed = tmp_path / "trimmed.mp4"
    _run_timing(source, trimmed, source_photo, trim_start=5, trim_end=15)
    t_starts, t_end, _ = _timing(trimmed)
    assert len(t_starts) == 10 and abs(t_end - 10 * frame) < frame / 2


def test_gif_output_is_refused_in_words() -> None:
    with pytest.raises(OutputError, match="GIF output is not supported.*write .mp4"):
        check_encoder(EncodeSettings(), ".gif")


# -- 4. frame folders --


def test_mixed_size_folder_swaps_each_frame_by_its_own_geometry(tmp_path: Path, source_photo: Path,
                                                                astronaut_patch: np.ndarray) -> None:
    """Landscape frames with a face around two portrait frames without one: a track must not carry the landscape
    face's place onto the portrait frames (it did: the face was pasted on their background)."""
    folder, output = tmp_path / "frames", tmp_path / "out"
    folder.mkdir()
    for i in range(10):
        if i in (4, 5):
            frame = synth.background(240, 320)
        else:
            frame = synth.paste_patch(synth.background(320, 240), astronaut_patch, synth.Placement(150 + 2 * i, 120, 0.95))
        Image.fromarray(frame).save(folder / f"frame_{i:04d}.png")
    (folder / "._frame_0000.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS metadata: not a frame
    summary = swap_folder([source_photo], folder, output, CLASSIC)
    assert summary.frames == 10 and summary.frames_swapped == 8
    for i in range(10):
        before = np.asarray(Image.open(folder / f"frame_{i:04d}.png"))
        after = np.asarray(Image.open(output / f"frame_{i:04d}.png"))
        changed = (before != after).any(axis=2)
        assert changed.any() == (i not in (4, 5)), i
    assert not (output / "._frame_0000.png").exists()


def test_refused_folder_job_leaves_nothing(tmp_path: Path, source_photo: Path, frames_dir: Path) -> None:
    folder, output = tmp_path / "frames", tmp_path / "out"
    folder.mkdir()
    for path in sorted(frames_dir.iterdir())[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "frame9.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    command = [sys.executable, "-c", "from cli import main; main()", "swap", str(source_photo), str(folder), "-o",
               str(output), "--swapper", "classic"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ)
    assert result.returncode == 2, result.stderr
    assert "frame9.png" in result.stderr.strip().splitlines()[-1]
    assert not output.exists()


# -- 5. SIGTERM --


def _command(source: Path, target: Path, output: Path) -> list[str]:
    return [sys.executable, "-c", "from cli import main; main()", "swap", str(source), str(target), "-o", str(output),
            "--swapper", "classic", "--chunk-frames", "3"]


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_and_the_rerun_equals_an_uninterrupted_run(tmp_path: Path, source_photo: Path,
                                                                                face_clip: Path) -> None:
    output, reference = tmp_path / "out.mp4", tmp_path / "reference.mp4"
    process = subprocess.Popen(_command(source_photo, face_clip, output), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    manifest = job_dir_for(output) / "manifest.json"
    wait_until_rendered(process, output, 300)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted: run the same command again to resume"
    assert json.loads(manifest.read_text())["rendered"], "finished chunks are kept"
    rerun = subprocess.run(_command(source_photo, face_clip, output), cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "chunks resumed" in rerun.stdout + rerun.stderr
    whole = subprocess.run(_command(source_photo, face_clip, reference), cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr
    assert output.read_bytes() == reference.read_bytes()


def _camera_clip(path: Path, configure: Callable[[av.video.stream.VideoStream], None]) -> Path:
    """8 frames of 160x120 H.264 at 25 fps, the stream set up by `configure` first (what a camera tags)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        configure(stream)
        for i in range(8):
            frame = av.VideoFrame.from_ndarray(synth.background(160, 120, seed=i), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def test_interlaced_input_is_flagged_interlaced_and_said_once(tmp_path: Path, source_photo: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    def interlaced(stream) -> None:
        stream.options = {"x264-params": "tff=1", "preset": "ultrafast"}
        stream.codec_context.field_order = 2  # top field first

    source = _camera_clip(tmp_path / "broadcast.mkv", interlaced)
    assert probe(source).interlaced
    output = tmp_path / "out.mkv"
    with caplog.at_level(logging.WARNING):
        _run_timing(source, output, source_photo)
    assert probe(output).interlaced
    assert len([r for r in caplog.records if "is interlaced" in r.getMessage()]) == 1


def test_a_timecode_track_is_kept_and_a_trim_says_it_drops_it(tmp_path: Path, source_photo: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    def timecode(stream) -> None:
        stream.metadata["timecode"] = "01:00:00:00"  # the mov muxer writes it as a tmcd track

    source = _camera_clip(tmp_path / "camera.mov", timecode)

    def timecodes(path: Path) -> list[str]:
        with av.open(str(path)) as container:
            return [s.metadata.get("timecode") for s in container.streams.data]

    assert timecodes(source) == ["01:00:00:00"]
    output = tmp_path / "out.mov"
    with caplog.at_level(logging.WARNING):
        _run_timing(source, output, source_photo)
    assert timecodes(output) == ["01:00:00:00"]
    assert not [r for r in caplog.records if "dropped" in r.getMessage()]
    trimmed = tmp_path / "trimmed.mov"
    with caplog.at_level(logging.WARNING):
        _run_timing(source, trimmed, source_photo, trim_start=2)
    assert timecodes(trimmed) == []
    assert len([r for r in caplog.records if "timecode" in r.getMessage() and "dropped" in r.getMessage()]) == 1


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_exit_like_ctrl_c_with_their_own_code(signum: int, code: int,
                                                                 capsys: pytest.CaptureFixture) -> None:
    import cli

    before = signal.getsignal(signum)  # SIG_DFL, or Ray's handler where an earlier test ran ray.init here
    with pytest.raises(SystemExit) as done:
        with cli._signals_stop_like_ctrl_c():
            try:
                os.kill(os.getpid(), signum)
                time.sleep(5)  # the handler raises in this thread before the sleep ends
            except KeyboardInterrupt as error:
                cli._interrupted(error)
    assert done.value.code == code
    assert capsys.readouterr().err.strip() == "interrupted: run the same command again to resume"
    assert signal.getsignal(signum) is before  # restored after the command

"""Media layer on generated clips: nothing lost (frames, timestamps, rotation, audio), clear errors."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from apple_video.errors import InputError, OutputError
from apple_video.media.images import list_frames, read_image, write_image
from apple_video.media.metadata import comment_of, is_synthetic_tag
from apple_video.media.paths import check_output
from apple_video.media.video import EncodeSettings, VideoWriter, concat_chunks, decode_frames, probe
from tests import synth


def _frames(n: int, size: tuple[int, int]) -> list[np.ndarray]:
    w, h = size
    bg = synth.background(w, h)
    return [np.roll(bg, 3 * i, axis=1) for i in range(n)]


def _audio_seconds(path: Path) -> list[float]:
    with av.open(str(path)) as container:
        out = []
        for stream in container.streams.audio:
            last = max((p.pts + p.duration) for p in container.demux(stream) if p.pts is not None)
            out.append(float(last * stream.time_base))
            container.seek(0)
        return out


def _transcode(src: Path, dst: Path, chunk: int = 7, codec: str = "libx264") -> None:
    info = probe(src)
    parts = []
    for k, start in enumerate(range(0, info.frame_count, chunk)):
        part = dst.with_name(f"{dst.stem}_part{k}{dst.suffix}")
        with VideoWriter(part, info, EncodeSettings(codec=codec), tag=False) as writer:
            for frame in decode_frames(info, start, start + chunk):
                writer.write(frame.rgb, frame.pts)
        parts.append(part)
    concat_chunks(parts, dst, src if info.audio else None, info.pts, info.time_base, info.rotation)


CASES = {
    "cfr": dict(size=(160, 120)),
    "vfr": dict(size=(160, 120), vfr=True),
    "rotated": dict(size=(160, 120), rotation=90),
    "odd": dict(size=(161, 121)),
    "silent": dict(size=(160, 120), audio_streams=0),
    "two_audio": dict(size=(160, 120), audio_streams=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_keeps_everything(tmp_path: Path, case: str) -> None:
    opts = dict(CASES[case])
    size = opts.pop("size")
    src = synth.write_clip(tmp_path / "in.mp4", _frames(20, size), fps=10, **opts)
    dst = tmp_path / "out.mp4"
    _transcode(src, dst)
    a, b = probe(src), probe(dst)
    assert b.frame_count == a.frame_count == 20
    assert b.pts == a.pts and b.time_base == a.time_base
    assert b.rotation == a.rotation == opts.get("rotation", 0)
    assert (b.width, b.height) == (a.width, a.height) == size
    assert a.vfr == b.vfr == bool(opts.get("vfr"))
    assert len(b.audio) == len(a.audio) == opts.get("audio_streams", 1)
    frame = 1 / float(a.fps)
    for src_s, dst_s in zip(_audio_seconds(src), _audio_seconds(dst), strict=True):
        assert abs(src_s - dst_s) <= frame
    with av.open(str(dst)) as container:
        assert is_synthetic_tag(comment_of(container.metadata))
    decoded = [f.rgb for f in decode_frames(b)]
    original = [f.rgb for f in decode_frames(a)]
    assert np.mean([np.abs(x.astype(int) - y).mean() for x, y in zip(decoded, original, strict=True)]) < 5  # issue 33: 3.8 (odd size)


def test_lossless_encoder_is_bit_exact(tmp_path: Path) -> None:
    src = synth.write_clip(tmp_path / "in.mkv", _frames(12, (96, 64)), fps=10)
    dst = tmp_path / "out.mkv"
    _transcode(src, dst, chunk=5, codec="ffv1")
    for x, y in zip(decode_frames(probe(src)), decode_frames(probe(dst)), strict=True):
        assert np.array_equal(x.rgb, y.rgb)


def test_chunked_decode_equals_whole(face_clip: Path) -> None:
    info = probe(face_clip)
    whole = list(decode_frames(info))
    assert [f.index for f in whole] == list(range(info.frame_count))
    pieces = []
    for start in range(0, info.frame_count, 11):  # chunks not aligned to keyframes on purpose
        pieces.extend(decode_frames(info, start, start + 11))
    assert [f.pts for f in pieces] == [f.pts for f in whole]
    assert all(np.array_equal(a.rgb, b.rgb) for a, b in zip(pieces, whole, strict=True))


def test_probe_facts(face_clip: Path) -> None:
    info = probe(face_clip)
    assert info.frame_count == 51 and info.fps == Fraction(15) and not info.vfr
    assert info.audio and info.audio[0].codec == "aac" and 0 in info.keyframes


def test_bad_videos(tmp_path: Path, face_clip: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        probe(tmp_path / "missing.mp4")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        probe(empty)
    text = tmp_path / "text.mp4"
    text.write_text("hello\n" * 100)
    with pytest.raises(InputError):
        probe(text)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(face_clip.read_bytes()[: face_clip.stat().st_size // 2])
    with pytest.raises(InputError):
        info = probe(truncated)
        list(decode_frames(info))
    audio_only = tmp_path / "audio.m4a"
    with av.open(str(audio_only), "w") as out:
        stream = out.add_stream("aac", rate=44100)
        samples = np.zeros((2, 1024), np.float32)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = 44100, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with pytest.raises(InputError, match="no video stream"):
        probe(audio_only)


def test_output_rules(tmp_path: Path, face_clip: Path) -> None:
    with pytest.raises(OutputError, match="equals"):
        check_output(face_clip, [face_clip], force=True)
    with pytest.raises(OutputError, match="does not exist"):
        check_output(tmp_path / "a" / "b.mp4", [face_clip], force=False)
    existing = tmp_path / "x.mp4"
    existing.write_bytes(b"1")
    with pytest.raises(OutputError, match="--force"):
        check_output(existing, [face_clip], force=False)
    assert check_output(existing, [face_clip], force=True) == existing


def test_images_of_every_kind(tmp_path: Path, astronaut: np.ndarray) -> None:
    rgba = np.dstack([astronaut[:64, :48], np.arange(64 * 48, dtype=np.uint8).reshape(64, 48)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    data = read_image(tmp_path / "a.png")
    assert data.alpha is not None and np.array_equal(data.alpha, rgba[..., 3])
    write_image(tmp_path / "a_out.png", data)
    back = Image.open(tmp_path / "a_out.png")
    assert back.mode == "RGBA" and np.array_equal(np.asarray(back), rgba)
    assert is_synthetic_tag(back.text.get("Comment"))

    Image.fromarray(astronaut[:40, :30, 0]).save(tmp_path / "g.png")
    gray = read_image(tmp_path / "g.png")
    assert gray.grayscale and gray.rgb.shape == (40, 30, 3)

    Image.fromarray(astronaut[:40, :30]).convert("CMYK").save(tmp_path / "c.jpg")
    assert read_image(tmp_path / "c.jpg").rgb.shape == (40, 30, 3)

    deep = (astronaut[:40, :30, 1].astype(np.uint16) * 257)
    Image.fromarray(deep).save(tmp_path / "d.png")
    d = read_image(tmp_path / "d.png")
    assert d.rgb.dtype == np.uint8 and np.array_equal(d.rgb[..., 0], astronaut[:40, :30, 1])

    img = Image.fromarray(astronaut[:40, :30])
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW when displayed
    img.save(tmp_path / "e.jpg", exif=exif.tobytes())
    assert read_image(tmp_path / "e.jpg").rgb.shape == (30, 40, 3)

    write_image(tmp_path / "t.jpg", read_image(tmp_path / "e.jpg"))
    assert is_synthetic_tag(Image.open(tmp_path / "t.jpg").info.get("comment", b"").decode())

    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(InputError, match="cannot read image"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(OutputError, match="unsupported output image"):
        write_image(tmp_path / "x.gifx", d)


def test_frame_folder_natural_order(tmp_path: Path) -> None:
    for name in ("f10.png", "f2.png", "f1.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_frames(tmp_path)] == ["f1.png", "f2.png", "f10.png"]
    with pytest.raises(InputError):
        list_frames(tmp_path / "nothing")


def test_decoded_frames_are_contiguous_for_padded_widths(tmp_path: Path) -> None:
    src = synth.write_clip(tmp_path / "w854.mp4", _frames(3, (854, 64)), fps=10)
    for frame in decode_frames(probe(src)):
        assert frame.rgb.flags.c_contiguous and frame.rgb.shape == (64, 854, 3)


def test_webm_output_reencodes_audio_it_cannot_copy(tmp_path: Path) -> None:
    src = synth.write_clip(tmp_path / "in.mp4", _frames(10, (96, 64)), fps=10)
    dst = tmp_path / "out.webm"
    _transcode(src, dst, chunk=4, codec="libvpx-vp9")
    info = probe(dst)
    assert info.frame_count == 10 and info.codec == "vp9"
    assert [a.codec for a in info.audio] == ["opus"]
    assert abs(_audio_seconds(dst)[0] - _audio_seconds(src)[0]) <= 0.1


def test_sixteen_bit_png_keeps_its_depth(tmp_path: Path, astronaut: np.ndarray) -> None:
    import cv2

    rng = np.random.default_rng(0)
    deep = (astronaut[:64, :80].astype(np.uint16) * 257 + rng.integers(0, 200, (64, 80, 3))).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), cv2.cvtColor(deep, cv2.COLOR_RGB2BGR))
    data = read_image(tmp_path / "deep.png")
    assert data.deep is not None and data.rgb.dtype == np.uint8
    edited = data.rgb.copy()
    edited[10:20, 10:20] = 0
    write_image(tmp_path / "out.png", data, edited)
    back = cv2.cvtColor(cv2.imread(str(tmp_path / "out.png"), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)
    assert back.dtype == np.uint16
    untouched = np.ones((64, 80), bool)
    untouched[10:20, 10:20] = False
    assert np.array_equal(back[untouched], deep[untouched])
    assert (back[10:20, 10:20] == 0).all()
    assert is_synthetic_tag(Image.open(tmp_path / "out.png").text.get("Comment"))


def test_a_clip_cut_short_fails_with_the_same_words_from_a_file_and_from_packets(face_clip: Path) -> None:
    """The decode window is one generator: a clip that ends before its listed frames names the frame it stopped at,
    in the same sentence whether the frames come from the file or from a worker's packets (not a tuple)."""
    from dataclasses import replace

    from apple_video.errors import DecodeError
    from apple_video.media.video import decode_packets, read_packets

    info = probe(face_clip)
    step = info.pts[1] - info.pts[0]
    longer = replace(info, pts=info.pts + tuple(info.pts[-1] + step * k for k in (1, 2, 3)))
    with pytest.raises(DecodeError) as from_file:
        list(decode_frames(longer, 40, ahead=0))
    packets = read_packets(info, 40, info.frame_count)
    packets = replace(packets, pts=longer.pts[40:], stop_pts=None)
    with pytest.raises(DecodeError) as from_packets:
        list(decode_packets(packets))
    expected = f"face.mp4: video is truncated or corrupt: decoding stopped at frame {info.frame_count} of {longer.frame_count}"
    assert str(from_file.value) == str(from_packets.value) == expected

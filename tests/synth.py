"""Synthetic test and example media: clips in which a real photographed face moves and scales, with audio.

Used by the test suite, the benchmarks and the bundled example (not shipped in the package); the photos come from packages
(matplotlib's grace_hopper.jpg, scikit-image's astronaut) or from `examples/`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

ASTRONAUT_FACE_BOX = (175, 76, 265, 166)  # x0, y0, x1, y1 of Eileen Collins' face in skimage's astronaut()


@dataclass(frozen=True)
class Placement:
    """Where the face patch's centre goes in a frame, and its scale."""

    cx: float
    cy: float
    scale: float


def background(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A textured, non-constant background so that 'untouched' checks mean something."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 / max(width - 1, 1)), (yy * 255 / max(height - 1, 1)), 128 + 0 * xx], axis=-1)
    noise = rng.integers(-20, 21, size=(height, width, 3))
    return np.clip(base * 0.6 + 40 + noise, 0, 255).astype(np.uint8)


def paste_patch(frame: np.ndarray, patch: np.ndarray, where: Placement) -> np.ndarray:
    """Paste `patch` scaled by `where.scale` centred at (cx, cy) with a soft oval edge (sub-pixel placement)."""
    h, w = patch.shape[:2]
    out_h, out_w = frame.shape[:2]
    matrix = np.array(
        [[where.scale, 0, where.cx - where.scale * w / 2], [0, where.scale, where.cy - where.scale * h / 2]],
        dtype=np.float64,
    )
    warped = cv2.warpAffine(patch, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    oval = np.zeros((h, w), np.float32)
    cv2.ellipse(oval, (w // 2, h // 2), (int(w * 0.47), int(h * 0.49)), 0, 0, 360, 1.0, -1)
    oval = cv2.GaussianBlur(oval, (0, 0), max(w, h) * 0.03)
    alpha = cv2.warpAffine(oval, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR)[..., None]
    return np.clip(frame * (1 - alpha) + warped * alpha + 0.5, 0, 255).astype(np.uint8)


def smooth_path(n: int, width: int, height: int, patch_size: int) -> list[Placement]:
    """A smooth left-right / up-down drift with a slow zoom, as a handheld shot might have."""
    path = []
    for i in range(n):
        t = i / max(n - 1, 1)
        scale = 1.0 + 0.35 * math.sin(math.pi * t)
        margin = patch_size * scale / 2 + 4
        cx = width / 2 + (width / 2 - margin) * 0.6 * math.sin(2 * math.pi * t)
        cy = height / 2 + (height / 2 - margin) * 0.3 * math.sin(math.pi * t)
        path.append(Placement(cx, cy, scale))
    return path


def face_frames(patch: np.ndarray, size: tuple[int, int], path: list[Placement], seed: int = 0) -> list[np.ndarray]:
    width, height = size
    bg = background(width, height, seed)
    return [paste_patch(bg, patch, where) for where in path]


def _audio_samples(seconds: float, rate: int, freq: float) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([tone, tone])


def write_clip(
    path: Path,
    frames: list[np.ndarray] | Callable[[int], np.ndarray],
    count: int | None = None,
    fps: int = 15,
    audio_streams: int = 1,
    vfr: bool = False,
    rotation: int = 0,
    codec: str = "libx264",
    crf: int = 12,
) -> Path:
    """Encode frames (RGB uint8) to `path` with `audio_streams` AAC tone tracks; VFR gives uneven frame gaps."""
    count = len(frames) if count is None else count
    get = frames if callable(frames) else frames.__getitem__
    first = get(0)
    height, width = first.shape[:2]
    time_base = Fraction(1, fps * 1000)
    step = 1000
    pts = [i * step + (step * 2 // 3 if vfr and i % 3 == 2 else 0) + (i // 3) * (step // 2 if vfr else 0) for i in range(count)]
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv444p" if (width % 2 or height % 2) else "yuv420p"
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        stream.options = {"crf": str(crf), "preset": "veryfast", "g": "15"}
        if rotation:
            stream.set_display_rotation(rotation)
        duration = float((pts[-1] + step) * time_base)
        audio = []
        for k in range(audio_streams):
            a = out.add_stream("aac", rate=44100)
            a.layout = "stereo"
            audio.append((a, _audio_samples(duration, 44100, 440.0 * (k + 1))))
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(get(i), format="rgb24")
            frame.pts, frame.time_base = pts[i], time_base
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        for a, samples in audio:
            for start in range(0, samples.shape[1], 1024):
                chunk = np.ascontiguousarray(samples[:, start : start + 1024])
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
                frame.sample_rate = 44100
                frame.pts = start
                out.mux(a.encode(frame))
            out.mux(a.encode(None))
    return path


def face_patch(photo: np.ndarray, box: tuple[int, int, int, int], margin: float = 0.6) -> np.ndarray:
    """Crop a face box with a margin around it (keeps forehead, chin and some hair)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    mx, my = int(w * margin), int(h * margin)
    H, W = photo.shape[:2]
    return np.ascontiguousarray(photo[max(0, y0 - my) : min(H, y1 + my), max(0, x0 - mx) : min(W, x1 + mx)])


def face_variants(photo: np.ndarray, box: tuple[int, int, int, int], count: int, seed: int, size: int = 200) -> list[np.ndarray]:
    """`count` different photos of the same face: shifted, scaled, slightly rotated, re-lit, on varied backgrounds."""
    rng = np.random.default_rng(seed)
    patch = face_patch(photo, box, margin=0.5)
    out = []
    for i in range(count):
        angle = rng.uniform(-8, 8)
        scale = rng.uniform(0.75, 0.95) * size / max(patch.shape[:2])
        h, w = patch.shape[:2]
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
        matrix[:, 2] += (size / 2 - w / 2 + rng.uniform(-8, 8), size / 2 - h / 2 + rng.uniform(-8, 8))
        bg = background(size, size, seed=seed * 100 + i)
        warped = cv2.warpAffine(patch, matrix, (size, size), borderMode=cv2.BORDER_CONSTANT)
        alpha = cv2.warpAffine(np.ones(patch.shape[:2], np.float32), matrix, (size, size))[..., None]
        lit = np.clip(warped.astype(np.float32) * rng.uniform(0.85, 1.15), 0, 255)
        out.append(np.clip(bg * (1 - alpha) + lit * alpha, 0, 255).astype(np.uint8))
    return out


def changed_within_face(before: np.ndarray, after: np.ndarray, margin: float = 0.25) -> tuple[int, float]:
    """(changed pixels, fraction of them inside the face): the face is the box of the dlib 68 landmarks found in
    `before`, grown by `margin` of its width on every side (the swap's mask reaches up the forehead)."""
    from apple_video.faces.detect import DetectorSettings, create_detector

    [face] = create_detector(DetectorSettings(name="dlib")).detect(np.ascontiguousarray(before[..., :3]))
    (x0, y0), (x1, y1) = face.landmarks.min(0), face.landmarks.max(0)
    grow = margin * (x1 - x0)
    changed = (after[..., :3] != before[..., :3]).any(axis=2)
    ys, xs = np.nonzero(changed)
    inside = (xs >= x0 - grow) & (xs <= x1 + grow) & (ys >= y0 - grow) & (ys <= y1 + grow)
    return int(changed.sum()), float(inside.mean()) if len(xs) else 0.0


# --- footage as cameras, phones and editors make it: deep pixels, HDR metadata, side streams, GIFs ---

HDR_MASTERING = "G(13250,34500)B(7500,3000)R(34000,16000)WP(15635,16450)L(10000000,50)"  # P3 D65, 1000 nits
HDR_LIGHT = (1000, 400)  # MaxCLL, MaxFALL
TRANSFER = {"pq": 16, "hlg": 18}  # FFmpeg's AVColorTransferCharacteristic


def deepen(frame: np.ndarray, seed: int = 0) -> np.ndarray:
    """A 16-bit frame with detail below the 8-bit step: the frame's levels plus a fine diagonal ramp."""
    height, width = frame.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = ((xx * 7 + yy * 3 + seed * 11) % 256).astype(np.int32)[..., None]  # 0..255 of a 65535 scale: sub-8-bit
    return np.clip(frame.astype(np.int32) * 257 - 128 + ramp, 0, 65535).astype(np.uint16)


def write_deep_clip(path: Path, frames: list[np.ndarray], fps: int = 10, codec: str = "libx265",
                    pix_fmt: str = "yuv420p10le", transfer: str | None = "hlg", hdr: bool = True) -> Path:
    """10-bit frames (uint16 RGB) as a phone or an editor writes them: BT.2020 tags with an HLG or PQ transfer and
    (hdr) mastering-display and light-level metadata (libx265), or ProRes 4:2:2 (prores_ks, pix_fmt yuv422p10le)."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "libx265":
            params = ["log-level=error", "keyint=5"]
            if hdr:
                params += [f"master-display={HDR_MASTERING}", f"max-cll={HDR_LIGHT[0]},{HDR_LIGHT[1]}"]
            stream.options = {"crf": "8", "preset": "ultrafast", "x265-params": ":".join(params)}
        elif codec == "prores_ks":
            stream.options = {"profile": "3"}
        ctx = stream.codec_context
        if transfer:
            ctx.color_primaries, ctx.colorspace, ctx.color_trc = 9, 9, TRANSFER[transfer]
        ctx.color_range = 1
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb48le")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def write_gif(path: Path, frames: list[np.ndarray], delay_ms: int = 80) -> Path:
    """An animated GIF (what the web hands out): `delay_ms` per frame, looping."""
    from PIL import Image

    pictures = [Image.fromarray(f).convert("P", palette=Image.ADAPTIVE) for f in frames]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=delay_ms, loop=0)
    return path


SUBTITLES = "1\n00:00:00,000 --> 00:00:00,500\nHello there\n\n2\n00:00:00,600 --> 00:00:00,900\nSecond line\n"
FONT = b"\x00\x01\x00\x00" + bytes(range(256))  # an attachment's bytes: carried, never parsed


def with_side_streams(clip: Path, path: Path, folder: Path) -> Path:
    """`clip` remuxed into a Matroska file with a SubRip subtitle, an attached font and a cover picture."""
    from PIL import Image

    srt, cover = folder / "subtitles.srt", folder / "cover.jpg"
    srt.write_text(SUBTITLES)
    Image.new("RGB", (64, 64), (200, 40, 40)).save(cover, "JPEG")
    with av.open(str(clip)) as source, av.open(str(srt)) as text, av.open(str(path), "w") as out:
        copies = {s.index: out.add_stream_from_template(s) for s in (*source.streams.video, *source.streams.audio)}
        subtitle = out.add_stream_from_template(text.streams.subtitles[0])
        subtitle.metadata["language"] = "eng"
        out.add_attachment("font.ttf", "application/x-truetype-font", FONT)
        out.add_attachment("cover.jpg", "image/jpeg", cover.read_bytes())
        for packet in source.demux():
            if packet.size and packet.stream.index in copies:
                packet.stream = copies[packet.stream.index]
                out.mux(packet)
        for packet in text.demux(text.streams.subtitles[0]):
            if packet.size:
                packet.stream = subtitle
                out.mux(packet)
    return path

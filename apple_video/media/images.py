"""Robust still-image I/O: EXIF orientation, alpha, grayscale, CMYK, 16-bit; synthetic-media tag on write."""

from __future__ import annotations

import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from apple_video.errors import InputError, OutputError
from apple_video.media.metadata import synthetic_tag
from apple_video.media.paths import atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
MAX_PIXELS = 120_000_000  # ~11000 x 11000: larger images are refused from their header, before decoding
_EXIF_DESCRIPTION = 0x010E
_EXIF_SOFTWARE = 0x0131


@dataclass
class ImageData:
    """An image ready for face work: 8-bit RGB pixels plus what is needed to write it back faithfully."""

    rgb: np.ndarray  # (H, W, 3) uint8, display orientation
    alpha: np.ndarray | None  # (H, W) uint8 or None
    grayscale: bool
    source_mode: str
    deep: np.ndarray | None = None  # the original 16-bit pixels (H, W[, C], RGB order), kept where untouched


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def is_frame_file(path: Path) -> bool:
    """An image file of a frame folder; hidden files (macOS `._name` AppleDouble, `.DS_Store`...) are not frames."""
    return not path.name.startswith(".") and is_image_path(path) and path.is_file()


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype in (np.uint16, np.int32, np.uint32) or array.max(initial=0) > 255:
        return np.clip(np.round(array.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    return np.clip(array, 0, 255).astype(np.uint8)


def _decode(image: Image.Image) -> ImageData:
    mode = image.mode
    alpha = None
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        gray = _to_uint8(np.asarray(image))
        return ImageData(np.repeat(gray[..., None], 3, axis=2), None, True, mode)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "PA"):
        image = image.convert("RGBA")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "1"):
        image = image.convert("RGB")
    if image.mode == "RGBA":
        arr = np.asarray(image)
        alpha = np.ascontiguousarray(arr[..., 3])
        rgb = np.ascontiguousarray(arr[..., :3])
    elif image.mode == "L":
        gray = np.asarray(image)
        return ImageData(np.repeat(gray[..., None], 3, axis=2), None, True, mode)
    else:
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    return ImageData(_to_uint8(rgb), alpha, False, mode)


def _read_deep_png(path: Path) -> ImageData | None:
    """16-bit PNGs (which Pillow narrows to 8 bits on open): keep the 16-bit pixels for writing back."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.dtype != np.uint16:
        return None
    if raw.ndim == 2:
        deep = raw
    elif raw.shape[2] == 4:
        deep = cv2.cvtColor(raw, cv2.COLOR_BGRA2RGBA)
    else:
        deep = cv2.cvtColor(raw, cv2.COLOR_BGR2RGB)
    narrow = _to_uint8(deep)
    if narrow.ndim == 2:
        return ImageData(np.repeat(narrow[..., None], 3, axis=2), None, True, "I;16", deep)
    alpha = np.ascontiguousarray(narrow[..., 3]) if narrow.shape[2] == 4 else None
    return ImageData(np.ascontiguousarray(narrow[..., :3]), alpha, False, "RGB;16", deep)


def check_pixels(path: Path) -> None:
    """Read the size from the header only and refuse pixel bombs (a few MB that decode to tens of GB)."""
    size = ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
        pixels, size = width * height, f" ({width}x{height})"
    except Image.DecompressionBombError as error:  # Pillow's own limit (2 x 89 MP) names the pixel count only
        found = re.search(r"\((\d+) pixels\)", str(error))
        pixels = int(found.group(1)) if found else MAX_PIXELS + 1
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return  # not a header Pillow knows: the decoder below reports it
    if pixels > MAX_PIXELS:
        raise InputError(f"image {path} declares {pixels / 1e6:.0f} megapixels{size}, over the "
                         f"{MAX_PIXELS // 1_000_000} megapixel limit; scale it down first")


def read_image(path: str | Path) -> ImageData:
    """Read any supported still image into 8-bit RGB (+ alpha), EXIF rotation applied."""
    path = Path(path)
    if path.is_file() and path.stat().st_size > 0:
        check_pixels(path)
    if path.suffix.lower() == ".png" and path.is_file() and path.stat().st_size > 0:
        deep = _read_deep_png(path)
        if deep is not None:
            return deep
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if path.is_dir():
        raise InputError(f"expected an image file, got a directory: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"input is empty (0 bytes): {path}")
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return _decode(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InputError(f"cannot read image {path}: {error.__class__.__name__}: not a supported or intact image") from None


def _save_kwargs(image: Image.Image, suffix: str, description: str) -> dict:
    if suffix == ".png":
        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", description)
        info.add_text("Software", description)
        return {"pnginfo": info}
    exif = image.getexif()
    exif[_EXIF_DESCRIPTION] = description
    exif[_EXIF_SOFTWARE] = description
    if suffix in (".jpg", ".jpeg"):
        return {"quality": 95, "subsampling": 0, "exif": exif.tobytes(), "comment": description}
    if suffix == ".webp":
        return {"lossless": True, "exif": exif.tobytes()}
    if suffix in (".tif", ".tiff"):
        return {"exif": exif.tobytes(), "compression": "tiff_lzw"}
    return {}


def to_pil(data: ImageData, rgb: np.ndarray | None = None) -> Image.Image:
    rgb = data.rgb if rgb is None else rgb
    if data.alpha is not None:
        return Image.fromarray(np.dstack([rgb, data.alpha]), "RGBA")
    if data.grayscale:
        return Image.fromarray(rgb, "RGB").convert("L")
    return Image.fromarray(rgb, "RGB")


def _png_text_chunk(keyword: str, text: str) -> bytes:
    body = keyword.encode("latin-1") + b"\0" + text.encode("latin-1")
    return struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body) & 0xFFFFFFFF)


def _deep_png_bytes(data: ImageData, rgb: np.ndarray) -> bytes:
    """16-bit output: the original 16-bit pixels wherever the 8-bit picture is unchanged, new pixels elsewhere."""
    deep = data.deep.copy()
    changed = (rgb != data.rgb).any(axis=2)
    if deep.ndim == 2:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257
        deep[changed] = gray[changed]
        encoded = deep
    else:
        deep[..., :3][changed] = rgb[changed].astype(np.uint16) * 257
        encoded = cv2.cvtColor(deep, cv2.COLOR_RGBA2BGRA if deep.shape[2] == 4 else cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".png", encoded)
    if not ok:
        raise OutputError("could not encode the 16-bit PNG")
    png = buffer.tobytes()
    end = png.rindex(b"IEND") - 4
    return png[:end] + _png_text_chunk("Comment", synthetic_tag()) + png[end:]


def write_image(path: str | Path, data: ImageData, rgb: np.ndarray | None = None) -> Path:
    """Write `rgb` (default: data.rgb) in the form of `data` (alpha, grayscale, 16 bits), atomically, tagged synthetic."""
    path = Path(path)
    suffix = path.suffix.lower()
    if data.deep is not None and suffix == ".png":
        with atomic_write(path) as tmp:
            tmp.write_bytes(_deep_png_bytes(data, data.rgb if rgb is None else rgb))
        return path
    if suffix not in IMAGE_EXTENSIONS:
        raise OutputError(f"unsupported output image type '{path.suffix}' (use one of {', '.join(IMAGE_EXTENSIONS)})")
    image = to_pil(data, rgb)
    if suffix in (".jpg", ".jpeg", ".bmp") and image.mode == "RGBA":
        image = image.convert("RGB")
    fmt = Image.registered_extensions()[suffix]
    with atomic_write(path) as tmp:
        image.save(tmp, format=fmt, **_save_kwargs(image, suffix, synthetic_tag()))
    return path


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_size(path: Path) -> tuple[int, int]:
    """(width, height) of a frame as it is shown (EXIF rotation applied), from its header; an unreadable frame is
    refused here, before any work."""
    if path.stat().st_size == 0:
        raise InputError(f"frame {path} is empty (0 bytes)")
    check_pixels(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InputError(f"cannot read frame {path}: {error.__class__.__name__}: not a supported or intact image") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def list_frames(folder: str | Path) -> list[Path]:
    """Image files of a frame folder in natural sort order (frame2 before frame10), hidden files left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"not a folder: {folder}")
    frames = [p for p in folder.iterdir() if is_frame_file(p)]
    if not frames:
        raise InputError(f"no image frames (png/jpg/webp/tiff) in folder: {folder}")
    return sorted(frames, key=lambda p: _natural_key(p.name))

"""What kind of input a path is: the one decision every command (and the batch lister) reads."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from apple_video.errors import InputError
from apple_video.media.images import IMAGE_EXTENSIONS, is_image_path
from apple_video.media.video import is_video_path

InputKind = Literal["video", "folder", "image", "batch"]


def input_kind(path: Path) -> InputKind:
    """A folder of videos (and no images) or a .txt list is a batch; any other folder is a folder of frames."""
    if path.is_dir():
        entries = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
        if any(is_video_path(p) for p in entries) and not any(is_image_path(p) for p in entries):
            return "batch"
        return "folder"
    if path.suffix.lower() == ".txt":
        return "batch"
    if is_image_path(path):
        return "image"
    if is_video_path(path):
        return "video"
    raise InputError(f"unsupported input type '{path.suffix}' (videos: mp4/mov/mkv/webm/avi..., images: "
                     f"{'/'.join(e.strip('.') for e in IMAGE_EXTENSIONS)}, or a folder of frames)")


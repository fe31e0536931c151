"""Media on the driver: frame sources and sinks, a video, a frame folder or one image, all seen as frames in display orientation."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apple_video.media.images import ImageData, frame_size, list_frames, read_image, write_image
from apple_video.media.paths import atomic_write
from apple_video.media.video import VideoInfo, probe


@dataclass(frozen=True)
class VideoMedia:
    info: VideoInfo

    @property
    def frame_count(self) -> int:
        return self.info.frame_count


@dataclass(frozen=True)
class FolderMedia:
    paths: tuple[Path, ...]
    sizes: tuple[tuple[int, int], ...] = ()  # (width, height) of each frame as shown

    @property
    def frame_count(self) -> int:
        return len(self.paths)

    @property
    def size_changes(self) -> frozenset[int]:
        """Frames whose size differs from the one before: no face track may cross them (another geometry)."""
        return frozenset(i for i in range(1, len(self.sizes)) if self.sizes[i] != self.sizes[i - 1])


def open_video(path: Path) -> VideoMedia:
    return VideoMedia(probe(path))


def open_folder(path: Path) -> FolderMedia:
    """The folder's frames, each one's header read (a broken frame is refused now, before any work)."""
    paths = tuple(list_frames(path))
    return FolderMedia(paths, tuple(frame_size(p) for p in paths))


def write_atomic(path: Path, data: bytes) -> None:
    """A chunk file the driver got from a worker (temp + rename, so a killed job never leaves half a chunk)."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


class FolderSink:
    """Write frames under their input names. Frames left untouched are copied byte for byte."""

    def __init__(self, media: FolderMedia, output: Path) -> None:
        self.media = media
        self.output = output

    def write(self, index: int, pts: int, rgb: np.ndarray, swapped: bool) -> None:
        source = self.media.paths[index]
        target = self.output / source.name
        if not swapped:
            with atomic_write(target) as tmp:
                shutil.copyfile(source, tmp)
            return
        data: ImageData = read_image(source)
        write_image(target, data, rgb)

"""Media on the driver: frame sources and sinks, a video, a frame folder or one image, all seen as frames in display orientation."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apple_video.media.images import ImageData, list_frames, read_image, write_image
from apple_video.media.paths import atomic_write
from apple_video.media.video import VideoInfo, decode_frames, probe, to_display


@dataclass(frozen=True)
class VideoMedia:
    info: VideoInfo

    @property
    def frame_count(self) -> int:
        return self.info.frame_count

    @property
    def fps(self) -> float:
        return float(self.info.fps)

    def frames(self, start: int, stop: int) -> Iterator[tuple[int, int, np.ndarray]]:
        for frame in decode_frames(self.info, start, stop):
            yield frame.index, frame.pts, to_display(frame.rgb, self.info.rotation)


@dataclass(frozen=True)
class FolderMedia:
    paths: tuple[Path, ...]
    fps: float = 25.0

    @property
    def frame_count(self) -> int:
        return len(self.paths)

    def frames(self, start: int, stop: int) -> Iterator[tuple[int, int, np.ndarray]]:
        for index in range(start, min(stop, len(self.paths))):
            yield index, index, read_image(self.paths[index]).rgb


def open_video(path: Path) -> VideoMedia:
    return VideoMedia(probe(path))


def open_folder(path: Path) -> FolderMedia:
    return FolderMedia(tuple(list_frames(path)))


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

    def close(self) -> None:
        pass

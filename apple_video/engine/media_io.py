"""Files the driver writes from what workers send back: video chunk files, and the frames of a frame folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from apple_video.media.images import ImageData, read_image, write_image
from apple_video.media.paths import atomic_write


def write_atomic(path: Path, data: bytes) -> None:
    """A chunk file the driver got from a worker (temp + rename, so a killed job never leaves half a chunk)."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


class FolderSink:
    """Write frames under their input names. Frames left untouched are copied byte for byte."""

    def __init__(self, paths: tuple[Path, ...], output: Path) -> None:
        self.paths = paths
        self.output = output

    def write(self, index: int, rgb: np.ndarray | None, swapped: bool) -> None:
        source = self.paths[index]
        target = self.output / source.name
        if not swapped:
            with atomic_write(target) as tmp:
                shutil.copyfile(source, tmp)
            return
        data: ImageData = read_image(source)
        write_image(target, data, rgb)

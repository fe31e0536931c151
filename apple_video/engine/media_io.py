"""Files the driver writes from what workers send back: video chunk files, and the frames of a frame folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from apple_video.media.images import ImageData, read_image, write_image
from apple_video.media.paths import temp_path_for


def write_atomic(path: Path, data: bytes) -> None:
    """A chunk file the driver got from a worker (temp + rename, so a killed job never leaves half a chunk)."""
    tmp = temp_path_for(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


class FolderSink:
    """Write frames under their input names. Frames left untouched are copied byte for byte."""

    def __init__(self, paths: tuple[Path, ...], output: Path) -> None:
        self.paths = paths
        self.output = output

    def write(self, index: int, rgb: np.ndarray | None, swapped: bool) -> None:
        source = self.paths[index]
        target = self.output / source.name
        if not swapped:
            tmp = temp_path_for(target)
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
            return
        data: ImageData = read_image(source)
        write_image(target, data, rgb)

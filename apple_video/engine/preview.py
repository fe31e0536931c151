"""`apple-video preview`: swap a few frames spread over a clip and write a before/after contact sheet."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from apple_video.engine.factories import EngineFactories
from apple_video.engine.still import StillRenderer
from apple_video.faces.types import SourceFace
from apple_video.media.images import ImageData, is_image_path, read_image, write_image
from apple_video.media.video import decode_frames, probe, to_display
from apple_video.settings import SwapSettings

CELL_WIDTH = 480


def _sample_frames(target: Path, count: int) -> list[np.ndarray]:
    if is_image_path(target):
        return [read_image(target).rgb]
    info = probe(target)
    picks = sorted({int(round(x)) for x in np.linspace(0, info.frame_count - 1, count)})
    return [to_display(next(decode_frames(info, i, i + 1)).rgb, info.rotation) for i in picks]


def _cell(rgb: np.ndarray) -> np.ndarray:
    scale = CELL_WIDTH / rgb.shape[1]
    return cv2.resize(rgb, (CELL_WIDTH, max(1, int(round(rgb.shape[0] * scale)))), interpolation=cv2.INTER_AREA)


def make_preview(sources: list[Path], target: Path, output: Path, settings: SwapSettings, count: int,
                 factories: EngineFactories | None = None, faces: Sequence[SourceFace] | None = None) -> str:
    """Each sampled frame swapped by the still renderer (as `swap` swaps an image); faceless frames shown as they are."""
    frames = _sample_frames(target, count)
    renderer = StillRenderer(settings, factories)
    renderer.use_sources(sources, faces or None)
    rows, swapped_faces = [], 0
    for rgb in frames:
        result = renderer.render(rgb, target, allow_no_faces=True)
        swapped_faces += result.faces_swapped
        rows.append(np.concatenate([_cell(rgb), _cell(result.rgb)], axis=1))
    sheet = np.concatenate(rows, axis=0)
    write_image(output, ImageData(sheet, None, False, "RGB"))
    return f"{output}: {len(frames)} frames (before | after), {swapped_faces} faces swapped"

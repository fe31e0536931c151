"""The still-image renderer: one swapper setup that swaps single pictures. `swap` on an image, `preview` sheets
and `eval pairs` all render through it, so a still is detected, selected and swapped one way, with its source
photos prepared exactly as a video job prepares them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apple_video.engine.clips import load_sources, source_detector
from apple_video.engine.factories import EngineFactories
from apple_video.engine.render import Renderer
from apple_video.errors import NoFaceError
from apple_video.faces.detect import detect_faces
from apple_video.faces.select import select_targets
from apple_video.faces.types import SourceFace
from apple_video.settings import SwapSettings
from apple_video.swappers.factory import tracking_for


def no_faces_message(path: Path, frames: int, detections: list[list], small: int, settings: SwapSettings,
                     where: str = "to swap in") -> str:
    found = sum(len(faces) for faces in detections)
    if found and small:
        cause = (f"the {small} faces found are smaller than {settings.selector.min_face_size} px; use a larger clip "
                 f"or a closer shot")
    elif found:
        cause = "faces were found but none matched the selector; try --face-selector-mode many"
    else:
        cause = ("no face was detected: faces may be small, sideways or turned away; try --face-detector insightface "
                 "(weights: `apple-video weights where`), --face-detector-angles 0 90 180 270 or --face-detector-size 1280")
    return (f"no face {where} {path} ({frames} frames analysed): {cause}; "
            f"--allow-no-faces writes the input through unchanged")


@dataclass(frozen=True)
class StillResult:
    rgb: np.ndarray
    swapped: bool
    faces_swapped: int
    faces_skipped: int
    small_faces_skipped: int


class StillRenderer:
    """Models, detector and face parser are loaded once; `use_sources` switches the identity (eval pairs)."""

    def __init__(self, settings: SwapSettings, factories: EngineFactories | None = None) -> None:
        factories = factories or EngineFactories.for_settings(settings)
        self.settings = settings
        self.swapper = factories.swapper()
        self.files = factories.files
        self.detector = factories.detector(settings.detector)
        self._source_detector = source_detector(settings, factories.detector)
        self._renderer: Renderer | None = None
        self._sources: tuple[Path, ...] | None = None

    def use_sources(self, paths: Sequence[Path], faces: Sequence[SourceFace] | None = None) -> None:
        """Swap in the faces of these source photos (`faces`: already found, in planning)."""
        if tuple(paths) == self._sources:
            return
        sources = list(faces) if faces is not None else load_sources(paths, self._source_detector,
                                                                      self.swapper.crop_size)
        if self._renderer is None:
            self._renderer = Renderer(self.settings, self.swapper, sources, self.files)
        else:
            self.swapper.prepare(sources)
        self._sources = tuple(paths)

    def render(self, rgb: np.ndarray, name: Path, allow_no_faces: bool) -> StillResult:
        """Swap the selected faces of one picture (a faceless one fails unless `allow_no_faces`)."""
        if self._renderer is None:
            raise RuntimeError("StillRenderer.use_sources must be called before render")
        detections = [detect_faces(self.detector, rgb)]
        if not detections[0] and not allow_no_faces:
            raise NoFaceError(no_faces_message(name, 1, detections, 0, self.settings, "found in the target image"))
        selection = select_targets(detections, 1.0, self.settings.selector, tracking_for(self.settings))
        if not any(selection.targets.values()) and detections[0] and not allow_no_faces:
            raise NoFaceError(no_faces_message(name, 1, detections, selection.skipped_small, self.settings,
                                               "found in the target image"))
        [(_, _, out, swapped)], stats = self._renderer.render([(0, 0, rgb)], selection.targets)
        return StillResult(out, bool(swapped), stats.faces_swapped, stats.faces_skipped, selection.skipped_small)

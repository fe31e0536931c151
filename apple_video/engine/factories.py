"""What the engine builds its models with: passed in, never looked up.

The run (`run_clips`, `swap_video`, `swap_folder`, `swap_image`, `run_batch`), its pools and workers, and the
still renderer (`StillRenderer`, preview, eval pairs) take an `EngineFactories` and build the swapper and the face
detectors only through it. A Job makes the default one from its settings (`EngineFactories.for_settings`); a
benchmark or a test hands in its own model instead of patching the engine:

    from apple_video.engine.factories import EngineFactories, quiet_detector
    from apple_video.engine.run import swap_video

    factories = EngineFactories(swapper=lambda: my_swapper, detector=quiet_detector)
    swap_video([source], clip, output, settings, factories)

The record goes to every worker (a Ray actor gets a pickled copy): with the Ray executor its callables must be
picklable (module-level functions, `functools.partial` of them); a lambda or closure works with the local executor.
The swapper factory is called once per render worker; the detector factory once per detector setting. `files`
(the model files the planner resolved, `model_files`) is where the renderers load the face parser and occlusion
net from.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from apple_video.faces.detect import FaceDetector, create_detector, detector_files
from apple_video.faces.occlusion import occlusion_files
from apple_video.faces.parsing import parser_files
from apple_video.settings import DetectorSettings, SwapSettings
from apple_video.swappers.base import Swapper
from apple_video.swappers.factory import create_swapper, resolve_swapper_name
from apple_video.swappers.presets import apple_files, apple_preset
from apple_video.weights import ModelFiles


def quiet_detector(settings: DetectorSettings, files: ModelFiles = ModelFiles()) -> FaceDetector:
    """The detector for `settings` from the planner's `files`, built without naming itself (the planner already said
    which one runs)."""
    return create_detector(settings, files, announce=False)


def support_files(settings: SwapSettings) -> ModelFiles:
    """For a planner: the files of the detector, the face parser and the occlusion net that `settings` use (named
    ones required, `auto` ones when present), and the parser APPLE's identity input uses when it is present."""
    files = detector_files(settings.detector) + parser_files(settings.mask.parser)
    if resolve_swapper_name(settings) == "apple":
        files = files + parser_files("auto")
    return files + occlusion_files("occlusion" in settings.mask.types)


def model_files(settings: SwapSettings) -> ModelFiles:
    """Every model file a run with `settings` loads, each checked once (a WeightsError names a missing one)."""
    swapper = ModelFiles()
    if resolve_swapper_name(settings) == "apple":
        swapper = apple_files(apple_preset(settings.model), settings.model)
    return swapper + support_files(settings)


@dataclass(frozen=True)
class EngineFactories:
    """How the engine's workers build their models (see the module docstring)."""

    swapper: Callable[[], Swapper]  # builds the swapper (loads its models): once per render worker
    detector: Callable[[DetectorSettings], FaceDetector] = quiet_detector  # analysis, source photos, stills
    files: ModelFiles = ModelFiles()  # what the renderers load their face parser and occlusion net from

    @classmethod
    def for_settings(cls, settings: SwapSettings, files: ModelFiles | None = None) -> EngineFactories:
        """The factories a job's settings ask for (the swapper and detector they name), loading from `files`, the
        model files the planner resolved (None: resolved now, `model_files`)."""
        files = model_files(settings) if files is None else files
        return cls(swapper=functools.partial(create_swapper, settings, files),
                   detector=functools.partial(quiet_detector, files=files), files=files)

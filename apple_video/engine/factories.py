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
The swapper factory is called once per render worker; the detector factory once per detector setting.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from apple_video.faces.detect import FaceDetector, create_detector
from apple_video.settings import DetectorSettings, SwapSettings
from apple_video.swappers.base import Swapper
from apple_video.swappers.factory import create_swapper
from apple_video.weights import ModelFiles


def quiet_detector(settings: DetectorSettings) -> FaceDetector:
    """The detector for `settings`, built without naming itself (the planner already said which one runs)."""
    return create_detector(settings, announce=False)


@dataclass(frozen=True)
class EngineFactories:
    """How the engine's workers build their models (see the module docstring)."""

    swapper: Callable[[], Swapper]  # builds the swapper (loads its models): once per render worker
    detector: Callable[[DetectorSettings], FaceDetector] = quiet_detector  # analysis, source photos, stills

    @classmethod
    def for_settings(cls, settings: SwapSettings, files: ModelFiles | None = None) -> EngineFactories:
        """The factories a job's settings ask for (the swapper and detector they name); `files`: the model files
        the planner resolved (None: the swapper looks them up when it is built)."""
        return cls(swapper=functools.partial(create_swapper, settings, files), detector=quiet_detector)

"""The engine builds its models only through the factories it is handed (engine/factories.py)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from apple_video.engine.factories import EngineFactories, quiet_detector
from apple_video.engine.run import swap_image, swap_video
from apple_video.faces.detect import FaceDetector
from apple_video.settings import DetectorSettings, SwapSettings
from apple_video.swappers.base import Swapper
from apple_video.swappers.classic import ClassicSwapper


@dataclass
class Counting:
    """Stand-in factories that build the real classic swapper and dlib detector, and count what they built."""

    swappers: list[Swapper] = field(default_factory=list)
    detectors: list[DetectorSettings] = field(default_factory=list)

    def swapper(self) -> Swapper:
        self.swappers.append(ClassicSwapper())
        return self.swappers[-1]

    def detector(self, settings: DetectorSettings) -> FaceDetector:
        self.detectors.append(settings)
        return quiet_detector(settings)

    def factories(self) -> EngineFactories:
        return EngineFactories(swapper=self.swapper, detector=self.detector)


def test_default_factories_pickle_for_ray_actors() -> None:
    factories = EngineFactories.for_settings(SwapSettings(swapper="classic"))
    again = pickle.loads(pickle.dumps(factories))
    assert again.swapper().name == "classic"
    assert again.detector(DetectorSettings(name="dlib")).name.startswith("dlib")


def test_video_job_builds_through_the_given_factories(tmp_path: Path, source_photo: Path, face_clip: Path) -> None:
    counting = Counting()
    summary = swap_video([source_photo], face_clip, tmp_path / "out.mp4", SwapSettings(swapper="classic"),
                         counting.factories())
    assert summary.faces_swapped > 0
    assert len(counting.swappers) == 1  # one render worker, one build
    assert counting.detectors  # the analysis and the source photo's detectors came from the factory too
    assert all(d.name == "auto" for d in counting.detectors)


def test_still_builds_through_the_given_factories(tmp_path: Path, source_photo: Path, hopper: np.ndarray) -> None:
    from PIL import Image

    target = tmp_path / "t.png"
    Image.fromarray(hopper).save(target)
    counting = Counting()
    summary = swap_image([source_photo], target, tmp_path / "o.png", SwapSettings(swapper="classic"),
                         counting.factories())
    assert summary.faces_swapped == 1 and len(counting.swappers) == 1


def test_model_files_are_resolved_once_and_passed_down(tmp_path: Path) -> None:
    from apple_video.engine.job import check_weights
    from apple_video.errors import WeightsError
    from apple_video.settings import ModelOptions
    from apple_video.weights import ModelFiles, is_present

    assert check_weights(SwapSettings(swapper="apple", model=ModelOptions(preset="tiny"))) == ModelFiles()
    assert check_weights(SwapSettings(swapper="classic")) == ModelFiles()
    stand_in = ModelFiles((("flux-krea-dev", tmp_path / "flux"),))
    assert stand_in("flux-krea-dev") == tmp_path / "flux"
    with pytest.raises(KeyError, match="not resolved"):
        stand_in("apple-student")  # the loader never looks a file up by itself
    factories = EngineFactories.for_settings(SwapSettings(swapper="apple", model=ModelOptions(preset="tiny")),
                                             stand_in)
    assert pickle.loads(pickle.dumps(factories)).swapper.args[1] == stand_in
    if not is_present("apple-student"):
        with pytest.raises(WeightsError, match="model file missing: apple-student"):
            ModelFiles.resolve(["apple-student", "apple-student"])

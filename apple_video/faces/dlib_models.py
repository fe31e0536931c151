"""Paths of the dlib model files shipped by the `face-recognition-models` package (located, not imported:
its __init__ needs pkg_resources)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from apple_video.errors import WeightsError

DLIB_FILES = {
    "landmarks68": "shape_predictor_68_face_landmarks.dat",
    "cnn_detector": "mmod_human_face_detector.dat",
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
}


def dlib_models_dir() -> Path | None:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def dlib_model_path(name: str) -> Path:
    """The path of one dlib model file, or a WeightsError naming it."""
    filename = DLIB_FILES[name]
    folder = dlib_models_dir()
    path = folder / filename if folder else None
    if path is None or not path.is_file():
        raise WeightsError(f"dlib model file missing: {filename} (install the `face-recognition-models` package)")
    return path

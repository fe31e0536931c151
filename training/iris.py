"""Iris points with gaze: MediaPipe's iris landmark model (`iris_landmark.tflite`) on eye crops.

As the official preprocessing (its MediaPipe_Iris port): each eye is cropped around the mean of its contour with
a side of twice the eye width, resized to 64x64, RGB in [0, 1]; the right eye is mirrored (the model knows left
eyes). The model returns 71 eye/brow points and 5 iris points (centre, then 4 on the rim), x and y in crop pixels,
mapped back to the image. The official code finds the eye contour with MediaPipe's face mesh; here it is dlib's
6 contour points of each eye (the face-mesh model needs a second network and its own detector).

The model runs under LiteRT (`ai-edge-litert`, or the older `tflite-runtime`), both of which work with numpy 2 and
do not pin protobuf; neither is a required dependency: without the runtime or the file, the iris points are
estimated from the eye contour (`training.deblur.irises_from_eyes`, no gaze), as the manifest then records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from apple_video.errors import WeightsError
from apple_video.weights import ModelFiles

logger = logging.getLogger(__name__)

PATCH = 64
SUBJECT_LEFT_EYE_68 = (42, 43, 44, 45, 46, 47)  # image right: the model's own orientation
SUBJECT_RIGHT_EYE_68 = (36, 37, 38, 39, 40, 41)  # image left: mirrored before and after
IrisModel = Callable[[np.ndarray], np.ndarray]  # (64, 64, 3) float32 in [0, 1] -> (5, 2) iris points in crop pixels


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            return None
    return Interpreter


def runtime_available() -> bool:
    return _interpreter_class() is not None


class TfliteIris:
    """`iris_landmark.tflite` under LiteRT: one 64x64 eye crop -> its 5 iris points."""

    def __init__(self, path: Path) -> None:
        interpreter = _interpreter_class()
        if interpreter is None:
            raise WeightsError("the iris model needs a LiteRT runtime: pip install ai-edge-litert")
        try:
            self.interpreter = interpreter(model_path=str(path), num_threads=1)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            raise WeightsError(f"{path} is not MediaPipe's iris_landmark.tflite ({error})") from None
        self.input = self.interpreter.get_input_details()[0]["index"]
        outputs = {d["name"]: d["index"] for d in self.interpreter.get_output_details()}
        if "output_iris" not in outputs:
            raise WeightsError(f"{path} is not MediaPipe's iris_landmark.tflite (no output_iris)")
        self.output = outputs["output_iris"]

    def __call__(self, patch: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input, patch[None].astype(np.float32))
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output).reshape(5, 3)[:, :2].copy()


def eye_patch(image: np.ndarray, contour: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The model's 64x64 [0, 1] crop of one eye, its top-left corner in the image and its scale (pixels per crop pixel)."""
    centre = np.asarray(contour, np.float64).mean(0).astype(int)
    side = max(int(2 * (contour[:, 0].max() - contour[:, 0].min())), 2)
    corner = centre - side // 2
    padded = cv2.copyMakeBorder(image, side, side, side, side, cv2.BORDER_REPLICATE)  # eyes near the border
    x, y = corner + side
    crop = padded[y : y + side, x : x + side]
    return cv2.resize(crop, (PATCH, PATCH), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0, corner, side / PATCH


def iris_points(image: np.ndarray, landmarks: np.ndarray, model: IrisModel) -> np.ndarray:
    """(10, 2) iris points (subject's right eye then left, 5 each: centre then rim) of a face with 68 landmarks."""
    lm = np.asarray(landmarks, np.float64)
    points = []
    for eye, mirrored in ((SUBJECT_RIGHT_EYE_68, True), (SUBJECT_LEFT_EYE_68, False)):
        patch, corner, scale = eye_patch(image, lm[list(eye)])
        if mirrored:
            patch = patch[:, ::-1].copy()
        iris = np.asarray(model(patch), np.float64)
        if mirrored:
            iris[:, 0] = PATCH - iris[:, 0]
        points.append(corner + iris * scale)
    return np.concatenate(points).astype(np.float32)


IrisSource = Literal["auto", "mediapipe", "estimated"]
MEDIAPIPE = "mediapipe-iris-on-dlib-eyes"
ESTIMATED = "estimated-from-eye-landmarks"
IRIS_WEIGHTS = "mediapipe-iris"


def iris_files(source: IrisSource) -> ModelFiles:
    """For a planner: `mediapipe` needs its file (one clear line without it), `auto` takes it when present."""
    if source == "mediapipe":
        return ModelFiles.resolve([IRIS_WEIGHTS])
    return ModelFiles.present([IRIS_WEIGHTS]) if source == "auto" else ModelFiles()


def create_iris_model(source: IrisSource, files: ModelFiles) -> tuple[IrisModel | None, str]:
    """The MediaPipe iris model (from the planner's `files`, see `iris_files`) and the manifest's name for the
    source. `auto`: when its file and a LiteRT runtime are present; `mediapipe`: required; `estimated`: never."""
    if source == "estimated":
        return None, ESTIMATED
    if source == "mediapipe":
        return TfliteIris(files(IRIS_WEIGHTS)), MEDIAPIPE
    if IRIS_WEIGHTS not in files:
        return None, ESTIMATED
    if not runtime_available():
        logger.warning("mediapipe-iris is present but no LiteRT runtime is installed (pip install ai-edge-litert): "
                       "iris points estimated from the eye contour")
        return None, ESTIMATED
    return TfliteIris(files(IRIS_WEIGHTS)), MEDIAPIPE

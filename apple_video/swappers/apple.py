"""The APPLE swapper: one aligned target crop -> swapped crop (invert with attribute-only, sample with full)."""

from __future__ import annotations

import logging

import numpy as np

from apple_video.config import Preset
from apple_video.models.pipeline import ApplePipeline, resolve_device
from apple_video.settings import ModelOptions
from apple_video.swappers.base import CropJob, SourceFace, ffhq_crop_matrix
from apple_video.swappers.presets import apple_preset
from apple_video.weights import ModelFiles

logger = logging.getLogger(__name__)


class AppleSwapper:
    """The `Swapper` for the diffusion model. The source identity is embedded once in `prepare`."""

    name = "apple"
    per_crop = False  # a batch's size changes the model's float results: the engine sends full batches

    def __init__(self, pipeline: ApplePipeline) -> None:
        self.pipeline = pipeline
        self.preset: Preset = pipeline.preset
        self.crop_size = pipeline.preset.sampling.crop_size
        self.real = pipeline.real
        self._id = None
        self._null = None

    @classmethod
    def from_options(cls, options: ModelOptions, files: ModelFiles = ModelFiles()) -> AppleSwapper:
        """The swapper the options ask for; `files`: the model files the planner resolved (`apple_files`; the tiny
        preset needs none)."""
        preset = apple_preset(options)
        pipeline = ApplePipeline.from_preset(preset, resolve_device(options.device), lora=options.lora,
                                             offload=options.offload, files=files)
        return cls(pipeline)

    def auto_batch_size(self) -> int:
        return self.pipeline.auto_batch_size()

    def crop_matrix(self, kps: np.ndarray, landmarks: np.ndarray | None) -> np.ndarray:
        return ffhq_crop_matrix(kps, self.crop_size)

    def prepare(self, sources: list[SourceFace]) -> None:
        self._id, self._null = self.pipeline.id_embedding(sources)

    def swap(self, jobs: list[CropJob]) -> list[np.ndarray | None]:
        if self._id is None:
            raise RuntimeError("prepare() must be called before swap()")
        if not jobs:
            return []
        crops = np.stack([job.crop for job in jobs])
        out = self.pipeline.swap(crops, self._id, self._null, [job.seed for job in jobs])
        return list(out)

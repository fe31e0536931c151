"""FLUX's shifted rectified-flow schedule (dynamic shift by image sequence length), via diffusers' scheduler."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

FLUX_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


@dataclass(frozen=True)
class Schedule:
    """sigmas[0] = 1 (noise) ... sigmas[-1] = 0 (data); `steps + 1` values."""

    sigmas: torch.Tensor

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def flipped(self) -> Schedule:
        return Schedule(torch.flip(self.sigmas, dims=(0,)))

    def to(self, device: torch.device | str) -> Schedule:
        """The same sigmas on `device` (the loops keep them beside the latents: no host tensor meets the model)."""
        return self if self.sigmas.device == torch.device(device) else Schedule(self.sigmas.to(device))

    def model_time(self, i: int) -> torch.Tensor:
        """The time the model sees at step i, computed as the official code does (sigma * 1000 / 1000)."""
        return (self.sigmas[i] * 1000) / 1000


def flux_schedule(steps: int, image_seq_len: int, config: dict | None = None,
                  device: torch.device | str = "cpu") -> Schedule:
    config = {**FLUX_SCHEDULER, **(config or {})}
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(image_seq_len, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"],
                         config["max_shift"])
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device="cpu")
    return Schedule(scheduler.sigmas.to(device=device, dtype=torch.float32))

"""Rectified-flow sampling and APPLE's attribute-aware inversion.

x_t = (1 - t) x0 + t eps, v = eps - x0. Euler: z += (sigma_next - sigma_cur) * v, the same formula in both
directions; the inversion walks the flipped schedule from t = 0 (clean target) to t = 1 (structured noise).

Solvers: "euler" (the official one, 1 velocity per step) and "fireflow" (FireFlow, arXiv 2412.07517: a midpoint
step whose start velocity is the previous step's midpoint velocity, so N steps cost N + 1 velocities with
second-order accuracy). The official second-order inversion (`second_order=True`) costs 2 per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch

from apple_video.sampling.inputs import ConditionKVCache, TransformerInputs, Velocity
from apple_video.sampling.schedule import Schedule

Solver = Literal["euler", "fireflow"]
SOLVERS: tuple[str, ...] = ("euler", "fireflow")


@dataclass(frozen=True)
class FlowCondition:
    """Everything but the latents and the time: text, attribute tokens, identity."""

    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor
    img_ids: torch.Tensor
    txt_ids: torch.Tensor
    guidance: float = 1.0
    condition: torch.Tensor | None = None
    id_embed: torch.Tensor | None = None
    id_weight: float = 1.0

    def inputs(self, latents: torch.Tensor, t: torch.Tensor, time_key: float | None = None) -> TransformerInputs:
        b = latents.shape[0]
        return TransformerInputs(
            latents=latents,
            timestep=t.to(latents.device, latents.dtype).expand(b),
            prompt_embeds=self.prompt_embeds,
            pooled_embeds=self.pooled_embeds,
            img_ids=self.img_ids,
            txt_ids=self.txt_ids,
            guidance=torch.full((b,), self.guidance, dtype=latents.dtype, device=latents.device),
            condition=self.condition,
            id_embed=self.id_embed,
            id_weight=self.id_weight,
            time_key=None if time_key is None else (time_key, self.guidance),
        )

    def attribute_only(self, null_id: torch.Tensor | None) -> FlowCondition:
        """(null id, F_att): what the inversion sees. It never carries the source identity."""
        return replace(self, id_embed=null_id)


VelocityAt = Callable[[torch.Tensor, torch.Tensor, float | None], torch.Tensor]  # (latents, t, t as a float) -> v


def _time_keys(schedule: Schedule) -> list[float | None]:
    """The step times as Python floats (keys of the transformer's time-embedding memo), read once per pass and
    before the schedule moves to the device; none for a schedule that has no values (meta device)."""
    if schedule.sigmas.device.type == "meta":
        return [None] * (schedule.steps + 1)
    return schedule.sigmas.tolist()


def integrate(velocity_at: VelocityAt, latents: torch.Tensor, schedule: Schedule, solver: Solver = "euler") -> torch.Tensor:
    """Walk `schedule` from sigmas[0] to sigmas[-1] (either direction)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r} (choose from {', '.join(SOLVERS)})")
    keys = _time_keys(schedule)
    schedule = schedule.to(latents.device)  # no host tensor meets the model
    v = None
    for i in range(schedule.steps):
        d = schedule.sigmas[i + 1] - schedule.sigmas[i]
        if solver == "euler":
            latents = latents + d * velocity_at(latents, schedule.model_time(i), keys[i])
            continue
        if v is None:  # FireFlow: only the first step evaluates its start velocity
            v = velocity_at(latents, schedule.model_time(i), keys[i])
        mid = None if keys[i] is None else (keys[i] + keys[i + 1]) / 2
        v = velocity_at(latents + (d / 2) * v, schedule.sigmas[i] + d / 2, mid)
        latents = latents + d * v
    return latents


def invert(model: Velocity, latents: torch.Tensor, cond: FlowCondition, schedule: Schedule, second_order: bool = False,
           cache: ConditionKVCache | None = None, solver: Solver = "euler") -> torch.Tensor:
    """Clean latents (t=0) -> noise (t=1) along the flipped schedule.

    The second-order option matches the official code: the midpoint velocity is evaluated on the ORIGINAL
    latents at t = sigma_mid, then z += d v + 0.5 d^2 (v_mid - v) / (d / 2)."""
    sigmas = schedule.flipped()
    if not second_order:
        return integrate(lambda z, t, key: model(cond.inputs(z, t, key), cache), latents, sigmas, solver)
    sigmas = sigmas.to(latents.device)
    for i in range(sigmas.steps):
        s_cur, s_next = sigmas.sigmas[i], sigmas.sigmas[i + 1]
        v = model(cond.inputs(latents, sigmas.model_time(i)), cache)
        d = s_next - s_cur
        v_mid = model(cond.inputs(latents, s_cur + d / 2), cache)
        latents = latents + d * v + 0.5 * d**2 * ((v_mid - v) / (d / 2))
    return latents


def sample(model: Velocity, latents: torch.Tensor, cond: FlowCondition, schedule: Schedule,
           null_id: torch.Tensor | None = None, id_guidance: float = 1.0,
           cache: ConditionKVCache | None = None, solver: Solver = "euler") -> torch.Tensor:
    """Noise (t=1) -> clean latents (t=0). With id_guidance != 1: v = v_null + s (v_id - v_null).

    One condition cache serves both id passes: condition tokens never see the identity."""

    def velocity_at(z: torch.Tensor, t: torch.Tensor, key: float | None) -> torch.Tensor:
        v = model(cond.inputs(z, t, key), cache)
        if id_guidance != 1.0:
            v_null = model(replace(cond.inputs(z, t, key), id_embed=null_id), cache)
            v = v_null + id_guidance * (v - v_null)
        return v

    return integrate(velocity_at, latents, schedule, solver)

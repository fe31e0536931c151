"""Rectified-flow sampling and APPLE's attribute-aware inversion.

x_t = (1 - t) x0 + t eps, v = eps - x0. Euler: z += (sigma_next - sigma_cur) * v, the same formula in both
directions; the inversion walks the flipped schedule from t = 0 (clean target) to t = 1 (structured noise).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from apple_video.sampling.inputs import ConditionKVCache, TransformerInputs, Velocity
from apple_video.sampling.schedule import Schedule


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

    def inputs(self, latents: torch.Tensor, t: torch.Tensor) -> TransformerInputs:
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
        )

    def attribute_only(self, null_id: torch.Tensor | None) -> FlowCondition:
        """(null id, F_att): what the inversion sees. It never carries the source identity."""
        return replace(self, id_embed=null_id)


def invert(model: Velocity, latents: torch.Tensor, cond: FlowCondition, schedule: Schedule, second_order: bool = False,
           cache: ConditionKVCache | None = None) -> torch.Tensor:
    """Clean latents (t=0) -> noise (t=1) along the flipped schedule.

    The second-order option matches the official code: the midpoint velocity is evaluated on the ORIGINAL
    latents at t = sigma_mid, then z += d v + 0.5 d^2 (v_mid - v) / (d / 2)."""
    sigmas = schedule.flipped().to(latents.device)
    for i in range(sigmas.steps):
        s_cur, s_next = sigmas.sigmas[i], sigmas.sigmas[i + 1]
        v = model(cond.inputs(latents, sigmas.model_time(i)), cache)
        d = s_next - s_cur
        if second_order:
            v_mid = model(cond.inputs(latents, s_cur + d / 2), cache)
            latents = latents + d * v + 0.5 * d**2 * ((v_mid - v) / (d / 2))
        else:
            latents = latents + d * v
    return latents


def sample(model: Velocity, latents: torch.Tensor, cond: FlowCondition, schedule: Schedule,
           null_id: torch.Tensor | None = None, id_guidance: float = 1.0,
           cache: ConditionKVCache | None = None) -> torch.Tensor:
    """Noise (t=1) -> clean latents (t=0). With id_guidance != 1: v = v_null + s (v_id - v_null)."""
    uncond_cache = ConditionKVCache() if cache is not None else None
    schedule = schedule.to(latents.device)
    for i in range(schedule.steps):
        t = schedule.model_time(i)
        v = model(cond.inputs(latents, t), cache)
        if id_guidance != 1.0:
            v_null = model(replace(cond.inputs(latents, t), id_embed=null_id), uncond_cache)
            v = v_null + id_guidance * (v - v_null)
        latents = latents + (schedule.sigmas[i + 1] - schedule.sigmas[i]) * v
    return latents

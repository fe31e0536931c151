"""What a velocity function consumes: the inputs of one evaluation and the condition K/V cache.

Sampling and inversion only need a callable `(TransformerInputs, ConditionKVCache | None) -> velocity`; the
transformer in `models/` implements it. Keeping the records here lets `sampling` stand beside `models` without
importing it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class ConditionKVCache:
    """Condition-branch keys/values per attention layer, written at the first step and read afterwards.
    Exact only when condition tokens attend to themselves alone (`independent_condition`)."""

    keys: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def filled(self) -> bool:
        return bool(self.keys)


@dataclass
class TransformerInputs:
    """Inputs of one velocity evaluation. Shapes: B batch, N image tokens, T text tokens, C packed channels."""

    latents: torch.Tensor  # (B, N, C) noisy image tokens
    timestep: torch.Tensor  # (B,) in [0, 1]
    prompt_embeds: torch.Tensor  # (B, T, joint_dim)
    pooled_embeds: torch.Tensor  # (B, pooled_dim)
    img_ids: torch.Tensor  # (N, 3)
    txt_ids: torch.Tensor  # (T, 3)
    guidance: torch.Tensor | None = None  # (B,)
    condition: torch.Tensor | None = None  # (B, N_c, C) attribute tokens
    cond_ids: torch.Tensor | None = None  # (N_c, 3); None: same as img_ids
    id_embed: torch.Tensor | None = None  # (B, n_id, kv_dim)
    id_weight: float = 1.0
    adapter: str = "default"
    # (t, guidance) that `timestep` and `guidance` hold in every row, when the caller knows them: the model may
    # then reuse its time embeddings across calls (a schedule's times recur for every batch of a video)
    time_key: tuple[float, float] | None = None


Velocity = Callable[[TransformerInputs, ConditionKVCache | None], torch.Tensor]

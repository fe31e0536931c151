"""The per-branch reference forward of `AppleFluxTransformer`: the official APPLE code (OminiControl's multi-branch
forward + PuLID-FLUX) line by line, peft's LoRA on every branch with its scale switched per branch. It is the check
of the production (packed) forward and lives beside the oracle tests, not in the model.

Semantics (see models/transformer.py): every branch has its own adaLN modulation from its own timestep embedding;
the text branch uses the image branch's timestep, condition tokens timestep 0 and guidance 1 and the image tokens'
RoPE ids; the LoRA acts only on the condition branch (scale exactly 1); PuLID after every `double_interval`-th
double and `single_interval`-th single block; with `independent_condition` condition queries attend to condition
keys only, and a `ConditionKVCache` holds their K/V.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from peft.tuners.lora import LoraLayer
from torch import nn

from apple_video.models.transformer import AppleFluxTransformer
from apple_video.sampling.inputs import ConditionKVCache, TransformerInputs


@contextmanager
def lora_scope(layers: list[LoraLayer], adapter: str | None) -> Iterator[None]:
    """Within the block, only `adapter` is on, at scale exactly 1 (the official switch; alpha/r is ignored)."""
    saved = [dict(layer.scaling) for layer in layers]
    for layer in layers:
        for name in layer.scaling:
            layer.scaling[name] = 1.0 if name == adapter else 0.0
    try:
        yield
    finally:
        for layer, scales in zip(layers, saved, strict=True):
            layer.scaling.update(scales)


def _loras(module: nn.Module) -> list[LoraLayer]:
    return [m for m in module.modules() if isinstance(m, LoraLayer)]


@dataclass
class Branch:
    """One token branch of a forward call."""

    hidden: torch.Tensor  # (B, N, inner_dim)
    temb: torch.Tensor  # (B, inner_dim)
    rope: tuple[torch.Tensor, torch.Tensor]
    adapter: str | None
    kind: str  # "text" | "image" | "condition"


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _attend(model: AppleFluxTransformer, qkv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], kinds: list[str],
            layer: int, cache: ConditionKVCache | None, reading: bool) -> list[torch.Tensor]:
    """Joint attention over branches, honouring independent_condition and the condition K/V cache."""
    independent = model.config.independent_condition
    keys = [k for _, k, _ in qkv]
    values = [v for _, _, v in qkv]
    if cache is not None and reading:
        cached_k, cached_v = cache.keys[layer]
        keys, values = [*keys, cached_k], [*values, cached_v]
    elif cache is not None:
        cond = [i for i, kind in enumerate(kinds) if kind == "condition"]
        cache.keys[layer] = (torch.cat([keys[i] for i in cond], 2), torch.cat([values[i] for i in cond], 2))
    main = [i for i, kind in enumerate(kinds) if not (independent and kind == "condition")]
    outputs: dict[int, torch.Tensor] = {}
    if main:
        q = torch.cat([qkv[i][0] for i in main], dim=2)
        out = F.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(values, 2))
        for i, piece in zip(main, out.split([qkv[i][0].shape[2] for i in main], dim=2), strict=True):
            outputs[i] = piece
    for i in range(len(kinds)):
        if i not in outputs:  # independent condition: attends only to condition keys
            cond = [j for j, other in enumerate(kinds) if other == "condition"]
            outputs[i] = F.scaled_dot_product_attention(
                qkv[i][0], torch.cat([qkv[j][1] for j in cond], 2), torch.cat([qkv[j][2] for j in cond], 2))
    b = qkv[0][0].shape[0]
    return [outputs[i].transpose(1, 2).reshape(b, outputs[i].shape[2], -1) for i in range(len(kinds))]


def _qkv(attn, h: torch.Tensor, rope, text: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if text:
        q, k, v = attn.add_q_proj(h), attn.add_k_proj(h), attn.add_v_proj(h)
        norm_q, norm_k = attn.norm_added_q, attn.norm_added_k
    else:
        q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
        norm_q, norm_k = attn.norm_q, attn.norm_k
    q, k, v = (_heads(t, attn.heads) for t in (q, k, v))
    q, k = norm_q(q), norm_k(k)
    return apply_rotary_emb(q, rope), apply_rotary_emb(k, rope), v


def _double_block(model: AppleFluxTransformer, block, branches: list[Branch], layer: int,
                  cache: ConditionKVCache | None, reading: bool) -> None:
    loras = _loras(block)
    mods, qkv = [], []
    for br in branches:
        with lora_scope(loras, br.adapter):
            if br.kind == "text":
                normed, *mod = block.norm1_context(br.hidden, emb=br.temb)
            else:
                normed, *mod = block.norm1(br.hidden, emb=br.temb)
            mods.append(mod)
            qkv.append(_qkv(block.attn, normed, br.rope, text=br.kind == "text"))
    attn_out = _attend(model, qkv, [br.kind for br in branches], layer, cache, reading)
    for br, (gate_msa, shift_mlp, scale_mlp, gate_mlp), out in zip(branches, mods, attn_out, strict=True):
        with lora_scope(loras, br.adapter):
            if br.kind == "text":
                h = br.hidden + block.attn.to_add_out(out) * gate_msa.unsqueeze(1)
                normed = block.norm2_context(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
                h = h + block.ff_context(normed) * gate_mlp.unsqueeze(1)
            else:
                h = br.hidden + block.attn.to_out[0](out) * gate_msa.unsqueeze(1)
                normed = block.norm2(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
                h = h + block.ff(normed) * gate_mlp.unsqueeze(1)
        br.hidden = h


def _single_block(model: AppleFluxTransformer, block, branches: list[Branch], layer: int,
                  cache: ConditionKVCache | None, reading: bool) -> None:
    loras = _loras(block)
    gates, mlps, qkv = [], [], []
    for br in branches:
        with lora_scope(loras, br.adapter):
            normed, gate = block.norm(br.hidden, emb=br.temb)
            mlps.append(block.act_mlp(block.proj_mlp(normed)))
            gates.append(gate)
            qkv.append(_qkv(block.attn, normed, br.rope, text=False))
    attn_out = _attend(model, qkv, [br.kind for br in branches], layer, cache, reading)
    for br, gate, mlp, out in zip(branches, gates, mlps, attn_out, strict=True):
        with lora_scope(loras, br.adapter):
            br.hidden = gate.unsqueeze(1) * block.proj_out(torch.cat([out, mlp], dim=2)) + br.hidden


def reference_forward(model: AppleFluxTransformer, x: TransformerInputs,
                      cache: ConditionKVCache | None = None) -> torch.Tensor:
    """Velocity for the image tokens, (B, N, C), as the official per-branch code computes it."""
    if cache is not None and not model.config.independent_condition:
        raise ValueError("the condition K/V cache is exact only with independent_condition=True")
    loras = _loras(model.x_embedder)
    with lora_scope(loras, None):
        image = model.x_embedder(x.latents)
    temb = model._temb(x.timestep, x.guidance, x.pooled_embeds)
    branches = [
        Branch(model.context_embedder(x.prompt_embeds), temb, model.pos_embed(x.txt_ids), None, "text"),
        Branch(image, temb, model.pos_embed(x.img_ids), None, "image"),
    ]
    reading = cache is not None and cache.filled
    use_condition = x.condition is not None and not reading
    if use_condition:
        with lora_scope(loras, x.adapter):
            cond = model.x_embedder(x.condition)
        zeros = torch.zeros_like(x.timestep)
        cond_temb = model._temb(zeros, torch.ones_like(x.timestep), x.pooled_embeds)
        cond_ids = x.cond_ids if x.cond_ids is not None else x.img_ids
        branches.append(Branch(cond, cond_temb, model.pos_embed(cond_ids), x.adapter, "condition"))
    elif cache is not None and not cache.filled:
        cache = None  # nothing to cache without a condition
    ca = 0
    for i, block in enumerate(model.transformer_blocks):
        _double_block(model, block, branches, i, cache, reading)
        if x.id_embed is not None and i % model.config.pulid_double_interval == 0:
            branches[1].hidden = branches[1].hidden + x.id_weight * model.pulid_ca[ca](x.id_embed, branches[1].hidden)
        if i % model.config.pulid_double_interval == 0:
            ca += 1
    for j, block in enumerate(model.single_transformer_blocks):
        _single_block(model, block, branches, len(model.transformer_blocks) + j, cache, reading)
        if x.id_embed is not None and j % model.config.pulid_single_interval == 0:
            branches[1].hidden = branches[1].hidden + x.id_weight * model.pulid_ca[ca](x.id_embed, branches[1].hidden)
        if j % model.config.pulid_single_interval == 0:
            ca += 1
    return model.proj_out(model.norm_out(branches[1].hidden, temb))

"""The packed fast path of APPLE's transformer blocks: each linear runs once over every token that shares
its weights, and the condition LoRA adds its delta only to the condition tokens.

Token layout. Double blocks keep the text tokens (T) apart, because their weights differ, and the image (N)
and condition (Nc) tokens together in one tensor `ic` (B, N + Nc, D); single blocks hold all of them in one
tensor (B, T + N + Nc, D) as stock FLUX does. Text and image rows share one adaLN modulation (the text
branch uses the image branch's timestep), the condition rows have their own: a segment index maps each
token to its modulation row. Condition tokens are always last, so the LoRA acts on rows `[lora_from:]`.

The functions are free functions of (block, tensors, static context) so that one `torch.compile` graph
serves every block of a kind; the condition K/V cache is read and written by the caller, outside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin_signed), each (1, 1, S, head_dim), float32
KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """Static facts of one forward call (plain ints and flags, so compiled graphs specialise on them)."""

    text: int  # T
    image: int  # N
    condition: int  # Nc computed in this call (0 without condition tokens or when they come from the cache)
    independent: bool  # condition queries attend only to condition keys
    adapter: str

    @property
    def main(self) -> int:
        return self.text + self.image


def lora_linear(module: torch.nn.Module, x: torch.Tensor, lora_from: int | None, adapter: str) -> torch.Tensor:
    """Base weights for every row; the LoRA delta (scale exactly 1, the official switch) only for rows
    `[lora_from:]` of dim 1 (dim 0 for 2-D inputs). Never calls peft's forward, whose scale is per module."""
    if not isinstance(module, LoraLayer):
        return module(x)
    out = module.base_layer(x)
    if lora_from is None or module.disable_adapters or adapter not in module.lora_A:
        return out
    lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
    rows = x[lora_from:] if x.dim() == 2 else x[:, lora_from:]
    delta = lora_b(lora_a(module.lora_dropout[adapter](rows.to(lora_a.weight.dtype)))).to(out.dtype)
    # in place on the fresh matmul output (its backward does not need it): two ops instead of a cat
    (out[lora_from:] if x.dim() == 2 else out[:, lora_from:]).add_(delta)
    return out


def rope_table(cos: torch.Tensor, sin: torch.Tensor) -> Rope:
    """diffusers' (cos, sin) (S, head_dim) -> a form that rotates with one flip and one multiply-add."""
    sign = torch.tensor([-1.0, 1.0], dtype=sin.dtype, device=sin.device).repeat(sin.shape[-1] // 2)
    return cos.float()[None, None], (sin.float() * sign)[None, None]


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Same result as diffusers' `apply_rotary_emb(x, (cos, sin))` for (B, H, S, D) inputs, in fewer ops."""
    cos, sin = rope
    pairs = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) per pair; the sign sits in `sin`
    return torch.addcmul(x * cos, pairs, sin).to(x.dtype)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _rms(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def _per_token(mod: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
    """(B, nseg, D) modulation rows -> broadcastable per-token values."""
    return mod if segments is None else mod[:, segments]


def _modulation(linear: torch.nn.Module, emb: torch.Tensor, batch: int, chunks: int, cond_rows: bool,
                adapter: str) -> list[torch.Tensor]:
    """adaLN rows for (main[, condition]) from silu(temb) rows (nseg * B, D): `chunks` tensors of (B, nseg, D)."""
    out = lora_linear(linear, emb, batch if cond_rows else None, adapter)
    return list(out.unflatten(0, (-1, batch)).transpose(0, 1).chunk(chunks, dim=-1))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
               cached: KV | None) -> tuple[torch.Tensor, KV | None]:
    """Joint attention. Rows are text, image[, condition]. Returns (B, S, H*D) and the condition K/V."""
    cond_kv = None
    if layout.condition:
        cond_kv = (k[:, :, layout.main:], v[:, :, layout.main:])
    if cached is not None:
        k, v = torch.cat([k, cached[0]], 2), torch.cat([v, cached[1]], 2)
    if layout.independent and layout.condition:
        main = F.scaled_dot_product_attention(q[:, :, :layout.main], k, v)
        cond = F.scaled_dot_product_attention(q[:, :, layout.main:], *cond_kv)
        out = torch.cat([main, cond], 2)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2), cond_kv


def double_block(block, txt: torch.Tensor, ic: torch.Tensor, emb: torch.Tensor, rope: Rope,
                 segments: torch.Tensor | None, layout: Layout, cached: KV | None
                 ) -> tuple[torch.Tensor, torch.Tensor, KV | None]:
    """One FLUX double block over text (B, T, D) and image[+condition] (B, N + Nc, D) tokens."""
    b, n, ad = txt.shape[0], layout.image, layout.adapter
    cond = layout.condition > 0
    attn = block.attn
    t_shift, t_scale, t_gate, t_shift2, t_scale2, t_gate2 = _modulation(
        block.norm1_context.linear, emb[:b], b, 6, False, ad)
    shift, scale, gate, shift2, scale2, gate2 = (_per_token(m, segments) for m in _modulation(
        block.norm1.linear, emb, b, 6, cond, ad))
    nt = torch.addcmul(t_shift, _layer_norm(txt), 1 + t_scale)
    nic = torch.addcmul(shift, _layer_norm(ic), 1 + scale)
    lora = n if cond else None
    q = torch.cat([_rms(attn.norm_added_q, _heads(lora_linear(attn.add_q_proj, nt, None, ad), attn.heads)),
                   _rms(attn.norm_q, _heads(lora_linear(attn.to_q, nic, lora, ad), attn.heads))], 2)
    k = torch.cat([_rms(attn.norm_added_k, _heads(lora_linear(attn.add_k_proj, nt, None, ad), attn.heads)),
                   _rms(attn.norm_k, _heads(lora_linear(attn.to_k, nic, lora, ad), attn.heads))], 2)
    v = torch.cat([_heads(lora_linear(attn.add_v_proj, nt, None, ad), attn.heads),
                   _heads(lora_linear(attn.to_v, nic, lora, ad), attn.heads)], 2)
    out, cond_kv = _attention(apply_rope(q, rope), apply_rope(k, rope), v, layout, cached)
    t_out, ic_out = out[:, :layout.text], out[:, layout.text:]

    txt = txt + lora_linear(attn.to_add_out, t_out, None, ad) * t_gate
    ff = block.ff_context.net
    hidden = ff[0](torch.addcmul(t_shift2, _layer_norm(txt), 1 + t_scale2))
    txt = txt + lora_linear(ff[2], hidden, None, ad) * t_gate2

    ic = ic + lora_linear(attn.to_out[0], ic_out, lora, ad) * gate
    ff = block.ff.net
    hidden = F.gelu(lora_linear(ff[0].proj, torch.addcmul(shift2, _layer_norm(ic), 1 + scale2), lora, ad),
                    approximate=ff[0].approximate)
    ic = ic + lora_linear(ff[2], hidden, lora, ad) * gate2
    return txt, ic, cond_kv


def single_block(block, hidden: torch.Tensor, emb: torch.Tensor, rope: Rope, segments: torch.Tensor | None,
                 layout: Layout, cached: KV | None) -> tuple[torch.Tensor, KV | None]:
    """One FLUX single block over all tokens (B, T + N + Nc, D); text and image share every linear."""
    b, ad, attn = hidden.shape[0], layout.adapter, block.attn
    cond = layout.condition > 0
    lora = layout.main if cond else None
    shift, scale, gate = (_per_token(m, segments) for m in _modulation(block.norm.linear, emb, b, 3, cond, ad))
    normed = torch.addcmul(shift, _layer_norm(hidden), 1 + scale)
    mlp = block.act_mlp(lora_linear(block.proj_mlp, normed, lora, ad))
    q = _rms(attn.norm_q, _heads(lora_linear(attn.to_q, normed, lora, ad), attn.heads))
    k = _rms(attn.norm_k, _heads(lora_linear(attn.to_k, normed, lora, ad), attn.heads))
    v = _heads(lora_linear(attn.to_v, normed, lora, ad), attn.heads)
    out, cond_kv = _attention(apply_rope(q, rope), apply_rope(k, rope), v, layout, cached)
    hidden = hidden + gate * lora_linear(block.proj_out, torch.cat([out, mlp], dim=2), lora, ad)
    return hidden, cond_kv

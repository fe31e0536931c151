"""PuLID-FLUX identity modules (v0.9.1): the IDFormer encoder and the PerceiverAttentionCA injections.

Tensor names follow PuLID's checkpoint (`pulid_encoder.*`, `pulid_ca.<i>.*`) so it loads as is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PerceiverAttentionCA(nn.Module):
    """Image tokens (queries) attend to the id tokens; the result is added to the image tokens by the caller.

    x: id tokens (B, n_id, kv_dim); latents: image tokens (B, n, dim) -> (B, n, dim)
    """

    def __init__(self, *, dim: int = 3072, dim_head: int = 128, heads: int = 16, kv_dim: int = 2048) -> None:
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm1 = nn.LayerNorm(kv_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(x).chunk(2, dim=-1)
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def _feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


def _mapping(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden),
                         nn.LayerNorm(hidden), nn.LeakyReLU(), nn.Linear(hidden, out_dim))


class PerceiverAttention(PerceiverAttentionCA):
    """IDFormer layer attention: latents attend to (context, latents). Same tensors as the CA module."""

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 16) -> None:
        super().__init__(dim=dim, dim_head=dim_head, heads=heads, kv_dim=dim)
        self.dim_head = dim_head

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), dim=-1).type(q.dtype)
        return self.to_out((weight @ v).permute(0, 2, 1, 3).reshape(b, n, -1))


class IDFormer(nn.Module):
    """ArcFace embedding + EVA-CLIP CLS (concatenated, `id_dim`) and 5 ViT hidden states -> `num_queries` id tokens."""

    def __init__(self, dim: int = 1024, depth: int = 10, dim_head: int = 64, heads: int = 16, num_id_token: int = 5,
                 num_queries: int = 32, output_dim: int = 2048, ff_mult: int = 4, id_dim: int = 1280,
                 vit_dim: int = 1024) -> None:
        super().__init__()
        if depth % 5:
            raise ValueError("IDFormer depth must be a multiple of 5 (one group per ViT feature scale)")
        self.num_id_token, self.dim, self.num_queries = num_id_token, dim, num_queries
        self.per_scale = depth // 5
        scale = dim**-0.5
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) * scale)
        self.proj_out = nn.Parameter(scale * torch.randn(dim, output_dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), _feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        for i in range(5):
            setattr(self, f"mapping_{i}", _mapping(vit_dim, vit_dim, dim))
        self.id_embedding_mapping = _mapping(id_dim, vit_dim, dim * num_id_token)

    def forward(self, id_cond: torch.Tensor, vit_hidden: list[torch.Tensor]) -> torch.Tensor:
        """id_cond (B, id_dim), vit_hidden 5 x (B, n_patches, vit_dim) -> (B, num_queries, output_dim)."""
        latents = self.latents.repeat(id_cond.size(0), 1, 1)
        x = self.id_embedding_mapping(id_cond).reshape(id_cond.size(0), -1, self.dim)
        latents = torch.cat((latents, x), dim=1)
        for i in range(5):
            context = torch.cat((x, getattr(self, f"mapping_{i}")(vit_hidden[i])), dim=1)
            for attn, ff in self.layers[i * self.per_scale : (i + 1) * self.per_scale]:
                latents = attn(context, latents) + latents
                latents = ff(latents) + latents
        return latents[:, : self.num_queries] @ self.proj_out

    def null_embedding(self, id_cond: torch.Tensor, vit_hidden: list[torch.Tensor]) -> torch.Tensor:
        """The unconditional id as PuLID and APPLE define it: the encoder applied to all-zero inputs."""
        return self(torch.zeros_like(id_cond), [torch.zeros_like(h) for h in vit_hidden])

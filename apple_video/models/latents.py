"""VAE encode/decode and FLUX 2x2 token packing (diffusers' own helpers, so layouts match FLUX exactly)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline


def vae_scale(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1] (x / 127.5 - 1, as the official inversion does)."""
    tensor = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    return tensor.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    unit = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
    return unit.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


def image_ids(height: int, width: int, vae: AutoencoderKL, device=None, dtype=torch.float32) -> torch.Tensor:
    """RoPE ids (N, 3) of the packed tokens of a (height, width) image; condition tokens reuse them."""
    scale = vae_scale(vae)
    return FluxPipeline._prepare_latent_image_ids(1, height // scale // 2, width // scale // 2, device, dtype)


@torch.no_grad()
def encode(vae: AutoencoderKL, images: np.ndarray | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images -> packed tokens (B, N, 4 * latent_channels): the latent mode (deterministic, inference and inversion),
    or with `generator` a draw from the latent distribution (`latent_dist.sample`, as the official trainer encodes
    its targets and conditions)."""
    pixels = to_unit(images).to(vae.device, vae.dtype)
    dist = vae.encode(pixels).latent_dist
    latents = dist.mode() if generator is None else dist.sample(generator)
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def decode_latents(vae: AutoencoderKL, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    latents = FluxPipeline._unpack_latents(tokens, height, width, vae_scale(vae))
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(latents.to(vae.dtype)).sample


@torch.no_grad()
def decode(vae: AutoencoderKL, tokens: torch.Tensor, height: int, width: int) -> np.ndarray:
    return to_uint8(decode_latents(vae, tokens, height, width))


def noise_tokens(batch: int, height: int, width: int, vae: AutoencoderKL, channels: int,
                 generator: torch.Generator) -> torch.Tensor:
    """Seeded Gaussian latents, packed, drawn with the same shape as diffusers' FluxPipeline.prepare_latents."""
    scale = vae_scale(vae)
    h, w = 2 * (height // (scale * 2)), 2 * (width // (scale * 2))
    latents = torch.randn((batch, channels, h, w), generator=generator, dtype=torch.float32)
    return FluxPipeline._pack_latents(latents, batch, channels, h, w)

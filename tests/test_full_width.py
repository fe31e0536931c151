"""The real dimensions on a CPU: 3072 wide, 24 heads of 128, 1024 image + 1024 condition + 512 text tokens, with
one double and one single block (and their PuLID cross-attentions and rank-64 LoRA) through `swap_latents` once,
so shapes at real size are exercised on every machine (a few GB of RAM, about a minute on two cores)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apple_video.config import load_preset, with_overrides
from apple_video.models.lora import add_condition_lora
from apple_video.models.pipeline import ApplePipeline, PromptEmbeddings
from apple_video.models.transformer import AppleFluxTransformer
from benchmarks.gpu import build_full_vae

CROP = 512


@pytest.mark.slow
@torch.no_grad()
def test_full_width_shallow_swap_on_the_cpu(astronaut: np.ndarray) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AppleFluxTransformer(num_layers=1, num_single_layers=1, idformer=None)  # every other size is FLUX.1's
        add_condition_lora(model, 64, init=False)
    model.eval()
    assert model.inner_dim == 3072 and model.transformer_blocks[0].attn.heads == 24
    tiny_vae = load_preset("tiny").model.vae  # 4 levels, 16 latent channels: 512 px -> 1024 tokens, as FLUX's VAE
    vae = build_full_vae(torch.device("cpu"), torch.float32, vae=tiny_vae)
    prompt = PromptEmbeddings(torch.randn(1, 512, 4096, generator=generator), torch.randn(1, 768, generator=generator))
    preset = with_overrides(load_preset("krea-512"), sampling_steps=1, recipe="student")
    pipe = ApplePipeline(preset, model, vae, prompt, identity=None, device=torch.device("cpu"), real=False)
    calls = []
    velocity = pipe._velocity
    pipe._velocity = lambda inputs, cache: (calls.append((inputs.latents.shape, inputs.condition.shape,
                                                          inputs.prompt_embeds.shape)), velocity(inputs, cache))[1]
    crop = np.ascontiguousarray(astronaut[:CROP, :CROP])[None]
    id_embed = torch.randn(1, 32, 2048, generator=generator)
    out = pipe.swap_latents(crop, id_embed, torch.zeros_like(id_embed), [0])
    assert calls == [((1, 1024, 64), (1, 1024, 64), (1, 512, 4096))]
    assert out.shape == (1, 1024, 64) and torch.isfinite(out).all()

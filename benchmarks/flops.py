"""FLOPs and host ops per face-frame at full krea-512 size, per --quality and recipe: CPU only, no weights.

The full-size transformer (19 + 38 blocks, rank-64 condition LoRA, 20 PuLID CA) and the FLUX VAE are built on
the meta device; FlopCounterMode counts one forward with condition tokens (and one that reads the condition
K/V cache) and a TorchDispatchMode counts the aten ops one forward dispatches (each is at least one kernel
launch and some Python on a GPU host). A face-frame is: VAE encode + [inversion] + sampling + VAE decode.

    python -m benchmarks.flops [--tflops 363]
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from apple_video.config import QUALITY_SETTINGS, SamplingSettings, load_preset
from apple_video.models.lora import add_condition_lora
from apple_video.models.transformer import AppleFluxTransformer, ConditionKVCache, TransformerInputs
from tests.oracle_reference import reference_forward

CROP, TEXT_TOKENS, ID_TOKENS = 512, 512, 32
RECIPES = ("inversion", "student")


class OpCounter(TorchDispatchMode):
    """Counts aten ops as they are dispatched (below autograd, after composite ops are decomposed)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class ForwardCost:
    full: float  # FLOPs of a forward that computes the condition tokens
    cached: float  # FLOPs of a forward that reads the condition K/V cache


def full_size_model(independent: bool) -> AppleFluxTransformer:
    with torch.device("meta"):
        model = AppleFluxTransformer(pulid_num_ca=20, independent_condition=independent)
        add_condition_lora(model, 64)
    return model.eval()


def inputs(model: AppleFluxTransformer, batch: int = 1) -> TransformerInputs:
    n = (CROP // 16) ** 2
    meta = {"device": "meta"}
    return TransformerInputs(
        latents=torch.empty(batch, n, 64, **meta), timestep=torch.empty(batch, **meta),
        prompt_embeds=torch.empty(batch, TEXT_TOKENS, 4096, **meta), pooled_embeds=torch.empty(batch, 768, **meta),
        img_ids=torch.zeros(n, 3, **meta), txt_ids=torch.zeros(TEXT_TOKENS, 3, **meta),
        guidance=torch.empty(batch, **meta), condition=torch.empty(batch, n, 64, **meta),
        id_embed=torch.empty(batch, ID_TOKENS, model.config.pulid_kv_dim, **meta))


def count_flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def count_ops(fn) -> int:
    with OpCounter() as counter:
        fn()
    return sum(counter.ops.values())


@torch.no_grad()
def forward_costs() -> tuple[ForwardCost, float]:
    """FLOPs of the packed forward (full, cache read) and of the reference per-branch forward."""
    model = full_size_model(independent=True)
    x = inputs(model)
    cache = ConditionKVCache()
    full = count_flops(lambda: model(x, cache))
    cached = count_flops(lambda: model(x, cache))
    return ForwardCost(full, cached), count_flops(lambda: reference_forward(model, x))


@torch.no_grad()
def host_ops() -> dict[str, int]:
    """Aten ops per forward, counted on the CPU with real tensors (attention and RMSNorm stay one op each, as
    on a GPU; on the meta device they decompose) on a model of full depth (19 + 38 blocks, 20 PuLID CA, LoRA on
    the same modules) but tiny width: the op count does not depend on width or token count."""
    torch.manual_seed(0)
    model = AppleFluxTransformer(num_layers=19, num_single_layers=38, attention_head_dim=16, num_attention_heads=2,
                                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
                                 pulid_dim_head=8, pulid_heads=2, pulid_kv_dim=16, pulid_num_ca=20,
                                 independent_condition=True).eval()
    add_condition_lora(model, 4)
    n, g = 64, torch.Generator().manual_seed(0)
    x = TransformerInputs(
        latents=torch.randn(1, n, 64, generator=g), timestep=torch.full((1,), 0.5), prompt_embeds=torch.randn(1, 8, 32),
        pooled_embeds=torch.randn(1, 32), img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(8, 3),
        guidance=torch.ones(1), condition=torch.randn(1, n, 64, generator=g), id_embed=torch.randn(1, ID_TOKENS, 16),
        time_key=(0.5, 1.0))
    cache = ConditionKVCache()
    model(x, cache)  # fills the cache and the RoPE / time-embedding memo
    ops = {"packed": count_ops(lambda: model(x)), "packed, condition cache read": count_ops(lambda: model(x, cache))}
    ops["reference (per-branch, peft LoRA on every branch)"] = count_ops(lambda: reference_forward(model, x))
    return ops


@torch.no_grad()
def vae_flops() -> float:
    with torch.device("meta"):
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    image = torch.empty(1, 3, CROP, CROP, device="meta")
    latents = torch.empty(1, 16, CROP // 8, CROP // 8, device="meta")
    return count_flops(lambda: (vae.encode(image), vae.decode(latents)))


def velocities(steps: int, solver: str, second_order: bool = False) -> int:
    if second_order:
        return 2 * steps
    return steps + 1 if solver == "fireflow" else steps


def frame_flops(s: SamplingSettings, recipe: str, cost: ForwardCost, cache_allowed: bool) -> tuple[float, int]:
    """(transformer FLOPs, transformer calls) of one face-frame."""
    calls = velocities(s.sampling_steps, s.solver) * (2 if s.id_guidance != 1.0 else 1)
    if recipe == "inversion":
        calls += velocities(s.inversion_steps, s.inversion_solver or s.solver, s.second_order)
    if s.condition_cache and cache_allowed:  # one cache per frame, shared by inversion and sampling
        return cost.full + (calls - 1) * cost.cached, calls
    return calls * cost.full, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tflops", type=float, default=363.0,
                        help="sustained bf16 TFLOP/s for the modelled seconds (default 363: 46%% of an H200's 790, "
                             "the rate measured at batch 8)")
    args = parser.parse_args()
    base = load_preset("krea-512").sampling
    cost, reference = forward_costs()
    ops = host_ops()
    vae = vae_flops()
    print(f"krea-512, one face crop {CROP}x{CROP}: 1024 image + 1024 condition + {TEXT_TOKENS} text tokens")
    print(f"forward: {cost.full / 1e12:.2f} TFLOP (reference per-branch forward: {reference / 1e12:.2f}, LoRA on "
          f"every branch); reading the condition K/V cache: {cost.cached / 1e12:.2f} TFLOP; "
          f"VAE encode + decode: {vae / 1e12:.2f} TFLOP")
    for name, count in ops.items():
        print(f"host ops per forward, {name}: {count} aten ops")
    print(f"modelled seconds at {args.tflops:.0f} TFLOP/s, VAE included; ratios to paper on transformer FLOPs "
          f"(and with the VAE)")
    print(f"{'quality':9} {'recipe':10} {'student':12} {'calls':>5} {'TFLOP':>8} {'seconds':>8} {'/paper':>7} {'+VAE':>6}")
    ratios: dict[tuple[str, str, bool], float] = {}
    for recipe in RECIPES:
        paper = SamplingSettings.model_validate({**base.model_dump(), **QUALITY_SETTINGS["paper"]})
        paper_flops, _ = frame_flops(paper, recipe, cost, cache_allowed=False)
        for quality, overrides in QUALITY_SETTINGS.items():
            s = SamplingSettings.model_validate({**base.model_dump(), **overrides})
            for independent in (False, True):
                flops, calls = frame_flops(s, recipe, cost, cache_allowed=independent)
                ratios[quality, recipe, independent] = flops / paper_flops
                student = "independent" if independent else "official"
                print(f"{quality:9} {recipe:10} {student:12} {calls:5d} {flops / 1e12:8.1f} "
                      f"{(flops + vae) / (args.tflops * 1e12):8.2f} {flops / paper_flops:7.3f} "
                      f"{(flops + vae) / (paper_flops + vae):6.3f}")
    print("official: the released student (condition tokens attend to all tokens, no K/V cache); independent: a "
          "student trained with independent_condition, whose condition K/V are computed once per frame")
    print(f"fast/paper FLOPs ratio (inversion recipe, independent student): {ratios['fast', 'inversion', True]:.3f}")
    print(f"balanced/paper FLOPs ratio: {ratios['balanced', 'inversion', True]:.3f}")


if __name__ == "__main__":
    main()

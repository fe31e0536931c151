"""The full-size APPLE model on one CUDA GPU, with random bf16 weights (speed does not depend on the values).

Builds the krea-512 architecture (FLUX.1-dev size: 19 double + 38 single blocks, 24 x 128 heads; PuLID CA x20 +
IDFormer; rank-64 condition LoRA) on the meta device, then `to_empty` on the GPU and a seeded init: seconds, no
weights needed. Prints a table:
- forward ms at batch 1, 8, 16 (per call and per face), FLOPs per forward (FlopCounterMode), achieved TFLOP/s and
  its fraction of the card's bf16 peak (the datasheet's where known, else a measured large matmul);
- VAE encode + decode per face; seconds per face-frame for each recipe at the best batch, from the project's own
  loops (`ApplePipeline.swap_latents`, a few steps, scaled to the preset's 28 / 28 + 28); peak GPU memory.
The last line is `seconds per face-frame (inversion, best batch): X.XX`. Without CUDA it refuses in one line (exit 2).

    python benchmarks/gpu.py [--batches 1,8,16] [--loop-steps 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import AutoencoderKL  # noqa: E402

from apple_video.config import Preset, load_preset, with_overrides  # noqa: E402
from apple_video.models import latents as L  # noqa: E402
from apple_video.models.lora import add_condition_lora  # noqa: E402
from apple_video.models.pipeline import ApplePipeline, PromptEmbeddings  # noqa: E402
from apple_video.models.transformer import AppleFluxTransformer, TransformerInputs  # noqa: E402

# dense bf16 tensor-core peaks from the datasheets, TFLOP/s (no sparsity), by a substring of the device name
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0}
CROP = 512
TEXT_TOKENS = 512


def build_full_transformer(device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                           lora_rank: int = 64) -> AppleFluxTransformer:
    """The krea-512 transformer (FLUX.1 size + PuLID + condition LoRA) with seeded random weights on `device`.

    Built on the meta device (no memory, no time), then materialised on `device` and filled in place. On the
    meta device itself it stays empty (a shape-only model for tests and FLOP counts)."""
    with torch.device("meta"):
        model = AppleFluxTransformer(idformer={}, pulid_num_ca=20)
        add_condition_lora(model, lora_rank, init=False)
    # cast while still on meta (materialising float32 first would need 51 GB); nn.Module.to: diffusers' own `to`
    # warns about fp32-kept modules, of which this model has none
    model = torch.nn.Module.to(model, dtype=dtype).requires_grad_(False)
    if device.type == "meta":
        return model.eval()
    model = model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:  # norm scales 1, biases 0: keeps activations in range through 57 blocks
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
        for buffer in model.buffers():
            buffer.zero_()
    return model.eval()


def build_full_vae(device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> AutoencoderKL:
    """FLUX's VAE architecture (16 latent channels, 4 levels) with seeded random weights."""
    v = load_preset("krea-512").model.vae
    torch.manual_seed(seed)
    with torch.device(device):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=tuple(v.block_out_channels), layers_per_block=v.layers_per_block,
            latent_channels=v.latent_channels, norm_num_groups=v.norm_num_groups, scaling_factor=v.scaling_factor,
            shift_factor=v.shift_factor, use_quant_conv=False, use_post_quant_conv=False)
    return torch.nn.Module.to(vae, dtype=dtype).requires_grad_(False).eval()


def forward_inputs(batch: int, device: torch.device, dtype: torch.dtype, kv_dim: int = 2048) -> TransformerInputs:
    """One velocity call at 512: 1024 image + 1024 condition + 512 text tokens."""
    g = torch.Generator().manual_seed(1)
    n = (CROP // 16) ** 2
    ids = torch.zeros(CROP // 16, CROP // 16, 3, device=device)
    ids[..., 1] = torch.arange(CROP // 16, device=device)[:, None]
    ids[..., 2] = torch.arange(CROP // 16, device=device)[None, :]

    def rand(*shape: int) -> torch.Tensor:
        if device.type == "meta":
            return torch.empty(*shape, device=device, dtype=dtype)
        return torch.randn(*shape, generator=g).to(device, dtype)

    return TransformerInputs(
        latents=rand(batch, n, 64), timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        prompt_embeds=rand(batch, TEXT_TOKENS, 4096), pooled_embeds=rand(batch, 768), img_ids=ids.reshape(-1, 3).to(dtype),
        txt_ids=torch.zeros(TEXT_TOKENS, 3, device=device, dtype=dtype), guidance=torch.ones(batch, device=device, dtype=dtype),
        condition=rand(batch, n, 64), id_embed=rand(batch, 32, kv_dim))


def cuda_ms(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Mean milliseconds per call, CUDA events after warm-up."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def flops_per_forward(model: AppleFluxTransformer, inputs: TransformerInputs) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(inputs)
    return counter.get_total_flops()


def bf16_peak(device: torch.device) -> tuple[float, str]:
    """(TFLOP/s, where the figure comes from): the datasheet when the card is known, else a measured matmul."""
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in name:
            return peak, "datasheet"
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = cuda_ms(lambda: a @ a, repeats=10, warmup=3)
    return 2 * 8192**3 / ms / 1e9, "measured 8192^3 matmul"


def preset_with_steps(steps: int, recipe: str) -> Preset:
    return with_overrides(load_preset("krea-512"), inversion_steps=steps, sampling_steps=steps, recipe=recipe)


def refuse_without_cuda() -> None:
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU and none is usable here; the GPU figures are still to be measured",
              file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,16", help="batch sizes of the forward timings")
    parser.add_argument("--loop-steps", type=int, default=4, help="steps of the timed loops (scaled to 28)")
    args = parser.parse_args(argv)
    refuse_without_cuda()
    device, dtype = torch.device("cuda"), torch.bfloat16
    started = time.perf_counter()
    model = build_full_transformer(device, dtype)
    params = sum(p.numel() for p in model.parameters())
    print(f"device: {torch.cuda.get_device_name(device)}; model {params / 1e9:.2f} B params, "
          f"{torch.cuda.memory_allocated(device) / 2**30:.1f} GiB, built in {time.perf_counter() - started:.1f} s")
    peak, peak_source = bf16_peak(device)
    flops = flops_per_forward(model, forward_inputs(1, device, dtype))
    print(f"FLOPs per forward (batch 1): {flops / 1e12:.2f} TFLOP; bf16 peak {peak:.0f} TFLOP/s ({peak_source})")

    rows, per_face = [], {}
    for batch in (int(b) for b in args.batches.split(",")):
        inputs = forward_inputs(batch, device, dtype)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            ms = cuda_ms(lambda inputs=inputs: model(inputs))
        achieved = flops * batch / (ms / 1e3) / 1e12
        per_face[batch] = ms / batch
        rows.append(f"| forward, batch {batch:2d} | {ms:8.1f} ms | {ms / batch:7.1f} ms/face | {achieved:6.1f} TFLOP/s "
                    f"| {achieved / peak:5.1%} of peak | {torch.cuda.max_memory_allocated(device) / 2**30:5.1f} GiB peak |")
        del inputs
    best = min(per_face, key=per_face.get)

    vae = build_full_vae(device, dtype)
    crops = torch.randint(0, 256, (best, CROP, CROP, 3), dtype=torch.uint8).numpy()
    with torch.no_grad():
        vae_ms = cuda_ms(lambda: L.decode_latents(vae, L.encode(vae, crops), CROP, CROP)) / best
    rows.append(f"| VAE encode + decode, batch {best} | {vae_ms * best:8.1f} ms | {vae_ms:7.1f} ms/face | | | |")

    g = torch.Generator().manual_seed(2)
    prompt = PromptEmbeddings(torch.randn(1, TEXT_TOKENS, 4096, generator=g), torch.randn(1, 768, generator=g))
    id_embed = torch.randn(1, 32, 2048, generator=g)
    seconds = {}
    torch.cuda.reset_peak_memory_stats(device)
    for recipe in ("student", "inversion"):
        preset = preset_with_steps(args.loop_steps, recipe)
        pipe = ApplePipeline(preset, model, vae, prompt, identity=None, device=device, real=False)  # ids given directly
        with torch.no_grad():
            loop_ms = cuda_ms(lambda pipe=pipe: pipe.swap_latents(crops, id_embed, id_embed, [0] * best), repeats=1)
        full = load_preset("krea-512").sampling
        scale = (full.sampling_steps + (full.inversion_steps if recipe == "inversion" else 0)) / (
            args.loop_steps * (2 if recipe == "inversion" else 1))
        seconds[recipe] = (loop_ms * scale / best + vae_ms) / 1e3
        rows.append(f"| face-frame, {recipe}, batch {best} | {seconds[recipe]:8.2f} s/face | | | | |")
    rows.append(f"| peak GPU memory (loops, batch {best}) | {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB | | | | |")
    print("| what | time | per face | achieved | of bf16 peak | memory |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"seconds per face-frame (student, best batch): {seconds['student']:.2f}")
    print(f"seconds per face-frame (inversion, best batch): {seconds['inversion']:.2f}")


if __name__ == "__main__":
    main()

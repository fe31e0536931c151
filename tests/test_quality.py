"""Speed levers: --quality levels against the paper settings, FireFlow, the condition K/V cache, the LoRA flag
for independent_condition students, compiled blocks, reused embeddings and host-op counts."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apple_video.config import QUALITY_SETTINGS, load_preset, with_overrides, with_quality
from apple_video.models import latents as L
from apple_video.models.lora import save_lora
from apple_video.models.pipeline import ApplePipeline, build_tiny
from apple_video.models.transformer import ConditionKVCache
from apple_video.sampling.flow import FlowCondition, invert, sample
from apple_video.sampling.schedule import flux_schedule
from benchmarks.flops import OpCounter
from tests.oracle import oracle_files, oracle_models
from tests.oracle_reference import reference_forward
from tests.test_model import _inputs, _tiny
from tests.test_sampling import _crops

ROOT = Path(__file__).resolve().parent.parent
# mean |quality - paper| in grey levels on the tiny preset (2 crops), where the swap itself moves ~67 levels
QUALITY_TOLERANCE = {"balanced": 6.0, "fast": 20.0}


def _ids():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 32, 16, generator=g), torch.randn(1, 32, 16, generator=g)


@pytest.mark.parametrize("independent", [False, True])
def test_each_quality_stays_close_to_paper(astronaut, independent: bool) -> None:
    crops = _crops(astronaut, 2)
    id_embed, null = _ids()
    outs = {}
    for quality in ("paper", "balanced", "fast"):
        preset = with_overrides(with_quality(load_preset("tiny"), quality), independent_condition=independent)
        outs[quality] = ApplePipeline.from_preset(preset, torch.device("cpu")).swap(crops, id_embed, null, [0, 1])
    assert np.abs(outs["paper"].astype(float) - crops).mean() > 30  # the swap does change the crops
    for quality, tolerance in QUALITY_TOLERANCE.items():
        difference = np.abs(outs[quality].astype(float) - outs["paper"]).mean()
        assert 0 < difference < tolerance, (quality, difference)


def test_paper_quality_is_the_official_settings() -> None:
    s = with_quality(load_preset("krea-512"), "paper").sampling
    assert (s.inversion_steps, s.sampling_steps, s.solver, s.inversion_solver, s.second_order) == (28, 28, "euler", None, False)
    assert not (s.condition_cache or s.compile or s.fp8)
    assert load_preset("krea-512").sampling.model_dump() == s.model_copy(update={"condition_cache": True}).model_dump()


@torch.no_grad()
def test_fireflow_beats_euler_at_equal_steps() -> None:
    """On the oracle model: 4 + 4 FireFlow steps land closer to the 28 + 28 Euler result than 4 + 4 Euler."""
    cfg, tensors = oracle_files()
    model, vae = oracle_models(cfg, tensors)
    trace = "results/inv/trace/0/"
    cond = FlowCondition(tensors["inputs/prompt_embeds"], tensors["inputs/pooled_prompt_embeds"],
                         L.image_ids(128, 128, vae), tensors[trace + "txt_ids/0"], 1.0, tensors[trace + "image_features/1"])
    tokens = L.encode(vae, tensors["inputs/trg_image_u8"][None].numpy())
    attr, full = cond.attribute_only(tensors["inputs/id_uncond"]), replace(cond, id_embed=tensors["inputs/id_src"])
    calls = []

    def velocity(inputs, cache):
        calls.append(1)
        return model(inputs, cache)

    def run(steps: int, solver: str) -> torch.Tensor:
        noise = invert(velocity, tokens, attr, flux_schedule(steps, 64), solver=solver)
        return sample(velocity, noise, full, flux_schedule(steps, 64), solver=solver)

    paper = run(28, "euler")
    calls.clear()
    fireflow = run(4, "fireflow")
    assert len(calls) == 5 + 5  # N + 1 velocities per pass
    euler = run(4, "euler")
    fire_error, euler_error = (float((x - paper).abs().mean()) for x in (fireflow, euler))
    assert fire_error < 0.5 * euler_error, (fire_error, euler_error)


@torch.no_grad()
def test_condition_cache_equals_no_cache_with_independent_condition(astronaut) -> None:
    """Inversion + sampling with one shared condition K/V cache == without it (and it is used: fewer ops)."""
    preset = with_overrides(load_preset("tiny"), independent_condition=True)
    transformer, vae, prompt, _ = build_tiny(preset)
    tokens = L.encode(vae, _crops(astronaut, 2))
    id_embed, null = _ids()
    cond = FlowCondition(prompt.prompt_embeds.expand(2, -1, -1), prompt.pooled_embeds.expand(2, -1),
                         L.image_ids(128, 128, vae), prompt.txt_ids, 1.0, tokens, id_embed.expand(2, -1, -1))

    def run(cache: ConditionKVCache | None) -> torch.Tensor:
        schedule = flux_schedule(4, tokens.shape[1])
        noise = invert(lambda x, c: transformer(x, c), tokens, cond.attribute_only(null.expand(2, -1, -1)), schedule,
                       cache=cache, solver="fireflow")
        return sample(lambda x, c: transformer(x, c), noise, cond, schedule, null.expand(2, -1, -1), 2.0, cache, "fireflow")

    cache = ConditionKVCache()
    assert (run(cache) - run(None)).abs().max() < 1e-6
    assert len(cache.keys) == 8  # 3 double + 5 single blocks
    inputs = _inputs(transformer, prompt)
    with OpCounter() as cached:
        transformer(inputs, cache)
    with OpCounter() as plain:
        transformer(inputs)
    assert sum(cached.ops.values()) < 0.8 * sum(plain.ops.values())


def test_lora_file_tells_the_pipeline_to_cache(tmp_path: Path, astronaut) -> None:
    """A student saved from an independent_condition model runs that way (and with the cache) when loaded."""
    preset = with_overrides(load_preset("tiny"), independent_condition=True)
    student, _, _, _ = build_tiny(preset)
    path = save_lora(student, tmp_path / "default.safetensors")
    pipe = ApplePipeline.from_preset(with_quality(load_preset("tiny"), "fast"), torch.device("cpu"), lora=path)
    assert pipe.transformer.config.independent_condition
    caches = []
    original = pipe._velocity
    pipe._velocity = lambda inputs, cache: (caches.append(cache), original(inputs, cache))[1]
    id_embed, null = _ids()
    pipe.swap(_crops(astronaut, 1), id_embed, null, [0])
    assert caches[0] is not None and all(c is caches[0] for c in caches)  # one cache per frame
    plain = ApplePipeline.from_preset(with_quality(load_preset("tiny"), "fast"), torch.device("cpu"))
    assert not plain.transformer.config.independent_condition


@torch.no_grad()
def test_embeddings_are_reused_across_calls() -> None:
    """RoPE once per set of ids, time embeddings once per (time, guidance) when the caller names the time."""
    transformer, _, prompt = _tiny()
    counts = {"rope": 0, "time": 0}
    hooks = [transformer.pos_embed.register_forward_hook(lambda *a: counts.__setitem__("rope", counts["rope"] + 1)),
             transformer.time_text_embed.register_forward_hook(lambda *a: counts.__setitem__("time", counts["time"] + 1))]
    inputs = _inputs(transformer, prompt)
    first = transformer(replace(inputs, time_key=(0.6, 1.0)))
    again = transformer(replace(inputs, latents=inputs.latents + 0.1, time_key=(0.6, 1.0)))
    transformer(replace(inputs, timestep=torch.full((2,), 0.3), time_key=(0.3, 1.0)))
    assert counts == {"rope": 1, "time": 2}
    next(transformer.time_text_embed.parameters()).mul_(1.5)  # new weights: the time embedding is recomputed
    changed = transformer(replace(inputs, time_key=(0.6, 1.0)))
    for hook in hooks:
        hook.remove()
    assert counts == {"rope": 1, "time": 3} and not torch.allclose(changed, first)
    next(transformer.time_text_embed.parameters()).div_(1.5)
    assert torch.allclose(first, transformer(inputs), atol=1e-6) and not torch.allclose(first, again)


@torch.no_grad()
def test_compiled_blocks_share_one_graph_per_kind() -> None:
    """Per-block compile: one graph serves all blocks of a kind, no recompile for a new time or for latents
    passed as their own condition (the first inversion step), and the same result as eager."""
    transformer, _, prompt = _tiny()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    inputs = _inputs(transformer, prompt)
    eager = transformer(inputs)
    transformer.compile_blocks(True, backend=counting_backend, dynamic=False)
    try:
        compiled = transformer(inputs)
        first = len(graphs)
        transformer(replace(inputs, timestep=torch.full((2,), 0.2)))
        transformer(replace(inputs, condition=inputs.latents))
    finally:
        transformer.compile_blocks(False)
        torch._dynamo.reset()
    assert torch.allclose(compiled, eager, atol=1e-5)
    assert 2 <= first <= 4 < len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert len(graphs) == first


@torch.no_grad()
def test_packed_forward_dispatches_fewer_ops() -> None:
    transformer, _, prompt = _tiny()
    inputs = _inputs(transformer, prompt)
    with OpCounter() as fast:
        transformer(inputs)
    with OpCounter() as reference:
        reference_forward(transformer, inputs)
    assert sum(fast.ops.values()) < 0.6 * sum(reference.ops.values())


def test_quality_and_fp8_options(tmp_path: Path, source_photo: Path, astronaut: np.ndarray) -> None:
    target = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(target)
    base = [sys.executable, "-c", "from cli import main; main()", "swap", str(source_photo), str(target), "--preset", "tiny"]
    result = subprocess.run([*base, "-o", str(tmp_path / "fast.png"), "--quality", "fast"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    try:
        import torchao  # noqa: F401
    except ImportError:
        result = subprocess.run([*base, "-o", str(tmp_path / "fp8.png"), "--fp8"], cwd=ROOT, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 2 and "--fp8 needs torchao" in result.stderr
        assert len(result.stderr.strip().splitlines()[-1]) < 120


def test_quality_levels_cover_the_choices() -> None:
    from apple_video.settings import QUALITY_CHOICES

    assert set(QUALITY_CHOICES) == set(QUALITY_SETTINGS)

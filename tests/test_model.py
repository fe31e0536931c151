"""The APPLE model: parity with the official code, LoRA/condition/identity semantics, checkpoint keys, weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from apple_video import weights
from apple_video.config import load_preset
from apple_video.errors import InputError, WeightsError
from apple_video.models.lora import add_condition_lora, load_lora, save_lora
from apple_video.models.pipeline import build_tiny, load_transformer
from apple_video.models.pulid import IDFormer
from apple_video.models.transformer import AppleFluxTransformer, ConditionKVCache, TransformerInputs
from tests.oracle import oracle_files, oracle_models
from tests.oracle_reference import reference_forward


@pytest.fixture(scope="module")
def oracle():
    cfg, tensors = oracle_files()
    model, vae = oracle_models(cfg, tensors)
    return cfg, tensors, model, vae


def traced_inputs(tensors, run: str, i: int, id_weight: float) -> TransformerInputs:
    p = f"results/{run}/trace/{i}/"
    return TransformerInputs(
        latents=tensors[p + "image_features/0"], timestep=tensors[p + "timesteps/1"],
        prompt_embeds=tensors[p + "text_features/0"], pooled_embeds=tensors["inputs/pooled_prompt_embeds"],
        img_ids=tensors[p + "img_ids/0"], txt_ids=tensors[p + "txt_ids/0"], guidance=tensors[p + "guidances/1"],
        condition=tensors[p + "image_features/1"], cond_ids=tensors[p + "img_ids/1"], id_embed=tensors[p + "id_embed"],
        id_weight=id_weight)


def test_every_traced_call_matches_official(oracle) -> None:
    cfg, tensors, model, _ = oracle
    count = 0
    for run, record in cfg["results"].items():
        for i, call in enumerate(record["calls"]):
            p = f"results/{run}/trace/{i}/"
            assert call["adapters"] == [None, None, "default"]
            assert float(tensors[p + "timesteps/2"]) == 0.0 and float(tensors[p + "guidances/2"]) == 1.0
            assert torch.equal(tensors[p + "img_ids/0"], tensors[p + "img_ids/1"])
            with torch.no_grad():
                out = model(traced_inputs(tensors, run, i, call["id_weight"]))
            assert (out - tensors[p + "out"]).abs().max() < 1e-4, (run, i)
            count += 1
    assert count == sum(len(r["calls"]) for r in cfg["results"].values()) == 32


def _tiny():
    preset = load_preset("tiny")
    transformer, vae, prompt, _ = build_tiny(preset)
    return transformer, vae, prompt


def _inputs(transformer, prompt, batch: int = 2, condition: bool = True, id_tokens: bool = True, seed: int = 0,
            id_weight: float = 1.0) -> TransformerInputs:
    g = torch.Generator().manual_seed(seed)
    n, c = 64, transformer.config.in_channels
    ids = torch.zeros(8, 8, 3)
    ids[..., 1] = torch.arange(8)[:, None]
    ids[..., 2] = torch.arange(8)[None, :]
    return TransformerInputs(
        latents=torch.randn(batch, n, c, generator=g), timestep=torch.full((batch,), 0.6),
        prompt_embeds=prompt.prompt_embeds.expand(batch, -1, -1), pooled_embeds=prompt.pooled_embeds.expand(batch, -1),
        img_ids=ids.reshape(-1, 3), txt_ids=prompt.txt_ids, guidance=torch.ones(batch),
        condition=torch.randn(batch, n, c, generator=g) if condition else None,
        id_embed=torch.randn(batch, 32, transformer.config.pulid_kv_dim, generator=g) if id_tokens else None,
        id_weight=id_weight)


def test_tiny_forward_shapes() -> None:
    transformer, _, prompt = _tiny()
    for condition in (True, False):
        for id_tokens in (True, False):
            for batch in (1, 3):
                with torch.no_grad():
                    out = transformer(_inputs(transformer, prompt, batch, condition, id_tokens))
                assert out.shape == (batch, 64, 64) and torch.isfinite(out).all()


def test_lora_has_no_effect_without_condition() -> None:
    transformer, _, prompt = _tiny()
    no_cond = _inputs(transformer, prompt, condition=False)
    with torch.no_grad():
        with_lora = transformer(no_cond)
        with_cond = transformer(_inputs(transformer, prompt))
        transformer.disable_adapters()
        without_lora = transformer(no_cond)
        without_lora_cond = transformer(_inputs(transformer, prompt))
        transformer.enable_adapters()
    assert torch.equal(with_lora, without_lora)
    assert (with_cond - without_lora_cond).abs().max() > 1e-4  # the LoRA does act on condition tokens


def test_condition_tokens_see_timestep_zero() -> None:
    transformer, _, prompt = _tiny()
    seen = []
    hook = transformer.time_text_embed.register_forward_hook(lambda m, args, out: seen.append((args[0].clone(), args[1].clone())))
    with torch.no_grad():
        transformer(_inputs(transformer, prompt))
    hook.remove()
    t_rows = torch.cat([t for t, _ in seen])
    g_rows = torch.cat([g for _, g in seen])
    assert len(t_rows) == 4  # batch 2: the image branch's rows, then the condition branch's (one call or two)
    assert torch.allclose(t_rows[:2], torch.full((2,), 600.0)) and torch.equal(t_rows[2:], torch.zeros(2))
    assert torch.equal(g_rows[2:], torch.full((2,), 1000.0))


def test_id_weight_zero_equals_no_id() -> None:
    transformer, _, prompt = _tiny()
    with torch.no_grad():
        a = transformer(_inputs(transformer, prompt, id_weight=0.0))
        b = transformer(_inputs(transformer, prompt, id_tokens=False))
        c = transformer(_inputs(transformer, prompt))
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-5


def test_condition_kv_cache_is_exact_when_independent() -> None:
    preset = load_preset("tiny")
    preset = preset.model_copy(update={"sampling": preset.sampling.model_copy(update={"independent_condition": True})})
    transformer, _, prompt, _ = build_tiny(preset)
    assert transformer.config.independent_condition
    cache = ConditionKVCache()
    with torch.no_grad():
        for step, t in enumerate((0.9, 0.5, 0.1)):
            inputs = _inputs(transformer, prompt, seed=step)
            inputs.timestep = torch.full((2,), t)
            inputs.condition = _inputs(transformer, prompt, seed=99).condition  # same attribute image each step
            plain = transformer(inputs)
            cached = transformer(inputs, cache)
            assert cache.filled
            assert (plain - cached).abs().max() < 1e-5, step
    dependent, _, _ = _tiny()
    with pytest.raises(ValueError, match="independent_condition"):
        dependent(_inputs(dependent, prompt), ConditionKVCache())


def test_full_size_keys_match_flux_and_pulid() -> None:
    with torch.device("meta"):
        flux = FluxTransformer2DModel(guidance_embeds=True)
        ours = AppleFluxTransformer(idformer={}, pulid_num_ca=20)
    flux_shapes = {k: tuple(v.shape) for k, v in flux.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {k: our_shapes[k] for k in flux_shapes} == flux_shapes
    extra = set(our_shapes) - set(flux_shapes)
    assert {k.split(".")[0] for k in extra} == {"pulid_ca", "pulid_encoder"}
    assert {int(k.split(".")[1]) for k in extra if k.startswith("pulid_ca.")} == set(range(20))
    assert our_shapes["pulid_ca.0.to_q.weight"] == (2048, 3072)
    assert our_shapes["pulid_ca.19.to_kv.weight"] == (4096, 2048)
    assert our_shapes["pulid_ca.7.to_out.weight"] == (3072, 2048)
    assert our_shapes["pulid_encoder.latents"] == (1, 32, 1024)
    assert our_shapes["pulid_encoder.proj_out"] == (1024, 2048)
    assert our_shapes["pulid_encoder.id_embedding_mapping.0.weight"] == (1024, 1280)
    assert our_shapes["pulid_encoder.id_embedding_mapping.6.weight"] == (5120, 1024)
    assert our_shapes["pulid_encoder.mapping_4.6.weight"] == (1024, 1024)
    assert our_shapes["pulid_encoder.layers.9.0.to_kv.weight"] == (2048, 1024)
    assert our_shapes["pulid_encoder.layers.9.1.1.weight"] == (4096, 1024)
    add_condition_lora(ours, 64)
    lora_a = [k for k in ours.state_dict() if k.endswith("lora_A.default.weight")]
    assert len(lora_a) == 1 + 19 * 6 + 38 * 6
    assert not any(k.startswith("transformer_blocks") and ("context" in k or "add_" in k) for k in lora_a)


def test_idformer_null_embedding_is_encoder_of_zeros() -> None:
    encoder = IDFormer(dim=32, depth=5, dim_head=8, heads=2, num_queries=4, output_dim=16, id_dim=20, vit_dim=12)
    cond, hidden = torch.randn(1, 20), [torch.randn(1, 5, 12) for _ in range(5)]
    null = encoder.null_embedding(cond, hidden)
    assert null.shape == (1, 4, 16)
    assert torch.equal(null, encoder(torch.zeros(1, 20), [torch.zeros(1, 5, 12)] * 5))
    assert not torch.allclose(null, torch.zeros_like(null))


def test_lora_save_load_round_trip(tmp_path: Path) -> None:
    transformer, _, prompt = _tiny()
    path = save_lora(transformer, tmp_path / "default.safetensors")
    from safetensors.torch import load_file

    keys = list(load_file(str(path)))
    assert all(k.startswith("transformer.") and ".default." not in k for k in keys)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    other, _, _, _ = build_tiny(load_preset("tiny").model_copy(update={"model": load_preset("tiny").model.model_copy(update={"seed": 5})}))
    inputs = _inputs(transformer, prompt)
    with torch.no_grad():
        before = transformer(inputs)
        assert (other(inputs) - before).abs().max() > 0
    # copy base weights, then the LoRA from the file: outputs must match exactly
    base = {k: v for k, v in transformer.state_dict().items() if "lora_" not in k}
    other.load_state_dict(base, strict=False)
    load_lora(other, path)
    with torch.no_grad():
        assert torch.equal(other(inputs), before)


def test_missing_and_corrupt_weights(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("APPLE_VIDEO_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsError, match="missing: apple-student.*weights where"):
        weights.require("apple-student")
    bad = tmp_path / "apple" / "student" / "default.safetensors"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"x" * 100)
    assert weights.status(weights.lookup("apple-student"))[0] == "corrupt"
    with pytest.raises(WeightsError, match="corrupt"):
        weights.require("apple-student")
    transformer, _, _ = _tiny()
    with pytest.raises(WeightsError, match="corrupt or unreadable"):
        load_lora(transformer, bad)
    with pytest.raises(InputError, match="not found"):
        load_lora(transformer, tmp_path / "nope.safetensors")


def test_load_transformer_from_diffusers_layout(tmp_path: Path) -> None:
    """The real loading path (meta device + shards + PuLID file) on a tiny checkpoint written the same way."""
    import json

    config = dict(load_preset("tiny").model.transformer)
    torch.manual_seed(0)
    flux = FluxTransformer2DModel(**config)
    flux.save_pretrained(tmp_path / "flux" / "transformer", max_shard_size="50KB")
    assert len(list((tmp_path / "flux" / "transformer").glob("*.safetensors"))) > 1
    cfg_path = tmp_path / "flux" / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(pulid_dim_head=8, pulid_heads=2, pulid_kv_dim=16)
    cfg_path.write_text(json.dumps(cfg))
    shapes = AppleFluxTransformer(**config, pulid_dim_head=8, pulid_heads=2, pulid_kv_dim=16, pulid_num_ca=20).state_dict()
    pulid = {k: torch.randn(v.shape) for k, v in shapes.items() if k.startswith("pulid_ca.")}
    save_file(pulid, str(tmp_path / "pulid.safetensors"))
    model = load_transformer(tmp_path / "flux", tmp_path / "pulid.safetensors", torch.float32, False)
    assert torch.equal(model.x_embedder.weight, flux.x_embedder.weight)
    assert torch.equal(model.pulid_ca[3].to_q.weight, pulid["pulid_ca.3.to_q.weight"])
    save_file({k: v for k, v in pulid.items() if not k.startswith("pulid_ca.19.")}, str(tmp_path / "short.safetensors"))
    with pytest.raises(WeightsError, match="does not fit"):
        load_transformer(tmp_path / "flux", tmp_path / "short.safetensors", torch.float32, False)
    save_file({**pulid, "pulid_ca.0.to_q.weight": torch.zeros(3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match="does not fit"):
        load_transformer(tmp_path / "flux", tmp_path / "bad.safetensors", torch.float32, False)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    transformer, _, prompt = _tiny()
    lora = [p for n, p in transformer.named_parameters() if "lora_" in n]
    transformer.requires_grad_(False)
    for p in lora:
        p.requires_grad_(True)
    grads = []
    for checkpointing in (False, True):
        transformer.gradient_checkpointing = checkpointing
        transformer.zero_grad()
        out = transformer(_inputs(transformer, prompt))
        out.pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in lora]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0


def test_packed_forward_equals_reference_and_lora_sees_only_condition_rows() -> None:
    """The packed path (shared linears, LoRA delta on condition rows only) computes what the per-branch one does."""
    transformer, _, prompt = _tiny()
    with torch.no_grad():
        for p in transformer.parameters():  # LoRA starts at zero in build_tiny: give it weight so it matters
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    rows = []
    hooks = [m.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[-2] if args[0].dim() == 3 else -1))
             for name, m in transformer.named_modules() if name.endswith("lora_A.default")]
    for condition in (True, False):
        inputs = _inputs(transformer, prompt, condition=condition)
        with torch.no_grad():
            rows.clear()
            fast = transformer(inputs)
            fast_rows = list(rows)
            reference = reference_forward(transformer, inputs)
        assert (fast - reference).abs().max() < 1e-5, condition
        # 3-D inputs of the LoRA are condition tokens only (64 of them); -1 marks the adaLN rows of the condition
        assert set(fast_rows) <= {64, -1} and (len(fast_rows) > 0) == condition
    for hook in hooks:
        hook.remove()

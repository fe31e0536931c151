"""The real loaders on real-format stand-in checkpoints (scripts/make_standins.py): the diffusers FLUX folder with
sharded transformer and both text encoders, PuLID v0.9.1 keys, EVA-CLIP's .pt, an ArcFace ONNX, the APPLE LoRA as
the official trainer saves it. `weights check`, the prompt encoding and its cache, and a clip swapped on a CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch
from safetensors import safe_open

from apple_video import weights
from apple_video.config import load_preset, with_overrides
from apple_video.models.pipeline import ApplePipeline, load_prompt_embeddings, prompt_cache_path
from apple_video.settings import ModelOptions
from apple_video.swappers.presets import apple_files

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("make_standins", ROOT / "scripts" / "make_standins.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory):
    """A weights home holding the stand-ins (the fixture the other stand-in tests share)."""
    home = tmp_path_factory.mktemp("standin-home")
    return _script().write_standins(home)


@pytest.fixture
def home(standins, monkeypatch):
    monkeypatch.setenv("APPLE_VIDEO_HOME", str(standins.home))
    monkeypatch.setenv("HF_HOME", str(standins.home / "hf"))
    return standins


def test_layouts_are_the_published_ones(standins) -> None:
    flux = standins.flux
    index = json.loads((flux / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    assert json.loads((flux / "model_index.json").read_text())["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
    for folder in ("vae", "text_encoder", "text_encoder_2", "scheduler", "tokenizer", "tokenizer_2"):
        assert (flux / folder).is_dir(), folder
    with safe_open(str(standins.pulid), framework="pt") as handle:
        keys = set(handle.keys())
    assert "pulid_encoder.latents" in keys and "pulid_ca.19.to_kv.weight" in keys
    assert {k.split(".")[0] for k in keys} == {"pulid_encoder", "pulid_ca"}
    eva = torch.load(str(standins.eva), weights_only=True)
    assert "visual.blocks.0.attn.q_bias" in eva and "visual.blocks.0.mlp.w3.weight" in eva
    with safe_open(str(standins.lora), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        lora_keys = list(handle.keys())
        assert all(k.startswith("transformer.") and ".lora_" in k for k in lora_keys)
        assert {handle.get_tensor(k).dtype for k in lora_keys} == {torch.bfloat16}
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight" in lora_keys
    assert "transformer.x_embedder.lora_B.weight" in lora_keys


@pytest.mark.slow
def test_our_lora_layout_gives_the_official_files_exact_size() -> None:
    """The student LoRA of the official repository is 463,703,368 bytes: what our target modules at rank 64 on the
    full-size model give, saved in bf16 with {"format": "pt"} (names, shapes, dtype and metadata all count)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save

    from apple_video.models.lora import add_condition_lora
    from apple_video.models.transformer import AppleFluxTransformer

    with torch.device("meta"):
        model = AppleFluxTransformer(idformer={}, pulid_num_ca=20)
        add_condition_lora(model, 64, init=False)
    state = get_peft_model_state_dict(model, adapter_name="default")
    data = {f"transformer.{k}": torch.zeros(v.shape, dtype=torch.bfloat16) for k, v in state.items()}
    assert len(save(data, metadata={"format": "pt"})) == weights.lookup("apple-student").size


def test_weights_check_sees_the_standins(standins) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "APPLE_VIDEO_HOME": str(standins.home),
           "HF_HOME": str(standins.home / "hf")}
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "weights", "check"], cwd=ROOT, capture_output=True,
                            text=True, env=env, timeout=120)
    lines = {line.split()[1]: line.split()[0] for line in result.stdout.splitlines() if len(line.split()) == 3}
    for name in ("flux-krea-dev", "pulid-flux-v0.9.1", "eva02-clip-l-336", "antelopev2-arcface"):
        assert lines[name] == "present", result.stdout
    assert lines["apple-student"] == "missing"  # its published size is pinned: the stand-in goes through --lora


def test_prompt_is_encoded_once_and_cached(home, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(home.flux / "tokenizer_2"))
    ids = tokenizer("a photo of human face").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁a", "▁photo", "▁of", "▁human", "▁face", "</s>"]
    path = prompt_cache_path(home.flux)
    path.unlink(missing_ok=True)
    first = load_prompt_embeddings(home.flux, torch.device("cpu"), torch.float32)
    assert path.is_file() and first.prompt_embeds.shape == (1, 512, 32) and first.pooled_embeds.shape == (1, 32)
    # the cache is read without the text encoders
    moved = tmp_path / "encoders"
    shutil.move(str(home.flux / "text_encoder_2"), str(moved))
    try:
        again = load_prompt_embeddings(home.flux, torch.device("cpu"), torch.float32)
    finally:
        shutil.move(str(moved), str(home.flux / "text_encoder_2"))
    assert torch.equal(first.prompt_embeds, again.prompt_embeds) and torch.equal(first.pooled_embeds, again.pooled_embeds)


def test_real_loaders_build_the_pipeline(home) -> None:
    preset = with_overrides(load_preset("krea-512"), inversion_steps=1, sampling_steps=1)
    files = apple_files(preset, ModelOptions(lora=str(home.lora)))  # as a job's planner resolves them
    pipe = ApplePipeline.from_preset(preset, torch.device("cpu"), lora=home.lora, files=files)
    assert pipe.real and pipe.transformer.config.num_layers == 3
    assert pipe.transformer.pulid_encoder is not None and len(pipe.transformer.pulid_ca) == 20
    assert pipe.identity.eva.patch_embed.img_size == (56, 56)
    # the LoRA file's values are what the model now holds (bf16 -> float32)
    with safe_open(str(home.lora), framework="pt") as handle:
        key = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
        expected = handle.get_tensor(key).float()
    actual = pipe.transformer.transformer_blocks[0].attn.to_q.lora_B["default"].weight
    assert torch.equal(actual, expected)


@pytest.mark.slow
def test_a_clip_is_swapped_with_the_standins(home, source_photo: Path, face_clip: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.mp4"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "APPLE_VIDEO_HOME": str(home.home), "HF_HOME": str(home.home / "hf")}
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "swap", str(source_photo), str(face_clip), "-o",
                             str(output), "--preset", "krea-512", "--steps", "1", "--lora", str(home.lora),
                             "--device", "cpu", "--trim-end", "3"], cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tiny" not in result.stderr  # the real loaders, not the tiny builder
    with av.open(str(output)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == 3

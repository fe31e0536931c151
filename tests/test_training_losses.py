"""Training details that the parity oracle cannot see: fresh teacher LoRA, fp32 LoRA weights, LPIPS, text drop,
the identity loss averaged over the samples it applies to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from apple_video.errors import WeightsError
from apple_video.faces.detect import DetectorSettings, create_detector
from tests.training_data import FixedSampler, aligned_faces
from training import loop
from training.config import load_train_config
from training.loop import Trainer, fp32_lora_params
from training.losses import load_lpips, lpips_files, vgg_features_to_lpips

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def faces(astronaut: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Aligned 128 crops of real face variants with their dlib landmarks and embeddings."""
    return aligned_faces(astronaut, create_detector(DetectorSettings(name="dlib")), 4)


def _config(tmp_path: Path, **overrides):
    return load_train_config(ROOT / "configs" / "train" / "tiny_teacher.yaml", data=tmp_path, output=tmp_path / "run",
                             **overrides)


def _lora(trainer: Trainer, part: str) -> list[torch.Tensor]:
    return [p for n, p in trainer.transformer.named_parameters() if f"lora_{part}.default" in n]


def test_teacher_starts_from_a_fresh_lora_without_any_lora_file(tmp_path, monkeypatch, faces) -> None:
    monkeypatch.setenv("APPLE_VIDEO_HOME", str(tmp_path / "no_weights"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no_hf"))
    trainer = Trainer(_config(tmp_path, steps=2, sample_every=100, lpips_weight=0.0), FixedSampler(faces))
    b, a = _lora(trainer, "B"), _lora(trainer, "A")
    assert b and all(torch.count_nonzero(p) == 0 for p in b)  # the LoRA starts as a no-op
    assert all(p.std() > 0 for p in a)
    trainer.train()
    assert any(torch.count_nonzero(p) > 0 for p in _lora(trainer, "B"))
    assert (tmp_path / "run" / "default.safetensors").is_file()


def test_lora_master_weights_stay_fp32_in_a_bf16_model(tmp_path, faces) -> None:
    trainer = Trainer(_config(tmp_path, steps=1, lpips_weight=0.0), FixedSampler(faces))
    model = trainer.transformer.to(torch.bfloat16)
    params = fp32_lora_params(model)
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base)
    linear = model.transformer_blocks[0].attn.to_q
    out = linear(torch.randn(2, linear.in_features, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_id_loss_is_averaged_over_the_samples_it_applies_to(tmp_path, faces, monkeypatch) -> None:
    cfg = _config(tmp_path, id_loss_start=0, id_loss_weight=0.5, id_loss_max_t=0.5, lpips_weight=0.0, drop_condition=0.0,
                  drop_id=0.0, drop_text=0.0)
    trainer = Trainer(cfg, FixedSampler(faces))
    seen: list[torch.Tensor] = []
    real = loop.identity_loss

    def spy(model, generated, source):
        values = real(model, generated, source)
        seen.append(values.detach())
        return values

    monkeypatch.setattr(loop, "identity_loss", spy)
    batch = FixedSampler(faces).batch(None, 4)
    for seed in range(50):  # a draw where some, not all, samples have t <= 0.5
        gen = torch.Generator().manual_seed(seed)
        t = torch.sigmoid(torch.randn(4, generator=torch.Generator().manual_seed(seed)))
        if 0 < int((t <= 0.5).sum()) < 4:
            break
    total, stats = trainer.loss(batch, 0, np.random.default_rng(0), gen)
    assert len(seen) == 1 and len(seen[0]) == int((t <= 0.5).sum())
    assert stats["id"] == pytest.approx(float(seen[0].mean()), rel=1e-5)
    assert float(total.detach()) == pytest.approx(float(stats["mse"] + 0.5 * stats["id"]), rel=1e-5)


def test_text_drop_feeds_the_empty_prompt(tmp_path, faces) -> None:
    cfg = _config(tmp_path, lpips_weight=0.0, id_loss_weight=0.0, drop_condition=0.0, drop_id=0.0, drop_text=1.0)
    trainer = Trainer(cfg, FixedSampler(faces))
    prompts = []
    model = trainer.model
    trainer.model = lambda inputs: prompts.append(inputs.prompt_embeds) or model(inputs)
    batch = FixedSampler(faces).batch(None, 2)
    trainer.loss(batch, 0, np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert torch.equal(prompts[0], trainer.empty_prompt.prompt_embeds.expand(2, -1, -1))
    assert not torch.equal(prompts[0][0], trainer.pipe.prompt.prompt_embeds[0])
    trainer.cfg = cfg.model_copy(update={"drop_text": 0.0})
    trainer.loss(batch, 0, np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert torch.equal(prompts[1], trainer.pipe.prompt.prompt_embeds.expand(2, -1, -1))


def test_lpips_term_with_a_random_backbone(tmp_path, faces) -> None:
    cfg = _config(tmp_path, lpips_weight=2.0, lpips_max_t=1.0, id_loss_weight=0.0, id_loss_start=0)
    trainer = Trainer(cfg, FixedSampler(faces))
    total, stats = trainer.loss(FixedSampler(faces).batch(None, 2), 0, np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert stats["lpips"] > 0
    assert float(total.detach()) == pytest.approx(float(stats["mse"] + 2.0 * stats["lpips"]), rel=1e-5)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.params)


def test_lpips_backbone_from_the_catalogue(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("APPLE_VIDEO_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsError, match="vgg16-lpips"):
        load_lpips("vgg16", torch.device("cpu"), lpips_files("vgg16"))  # the planner's check names the file
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16()
    path = tmp_path / "lpips" / "vgg16-397923af.pth"
    path.parent.mkdir()
    torch.save(vgg.state_dict(), path)
    model = load_lpips("vgg16", torch.device("cpu"), lpips_files("vgg16"))
    assert torch.equal(model.net.slice3._modules["10"].weight, vgg.features[10].weight)
    assert len(vgg_features_to_lpips(vgg.state_dict())) == 26
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert float(model(x, x)) == 0.0 and float(model(x, -x)) > 0
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    path.write_bytes(path.read_bytes() + b"\0" * 1_000_000)
    with pytest.raises(WeightsError):
        load_lpips("vgg16", torch.device("cpu"), lpips_files("vgg16"))


def test_a_bf16_model_trains_without_mixed_precision(tmp_path, faces) -> None:
    """krea-512 on CUDA holds bf16 weights; with `mixed_precision: "no"` (no autocast) the fp32 latents, noise and
    embeddings are cast to the model's dtype at its input, and the loss is taken in fp32. Here: the tiny model and
    VAE in bf16 on the CPU, the LoRA kept in fp32."""
    trainer = Trainer(_config(tmp_path, steps=1, lpips_weight=0.0, mixed_precision="no"), FixedSampler(faces))
    for name, param in trainer.transformer.named_parameters():
        if "lora_" not in name:
            param.data = param.data.bfloat16()
    trainer.pipe.vae.to(torch.bfloat16)
    trainer.pipe.dtype = torch.bfloat16
    rng, gen = trainer._generator(0, 0)
    loss, stats = trainer.loss(trainer.sampler.batch(rng, 2), 0, rng, gen)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainer.params)

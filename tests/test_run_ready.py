"""The paths a first real GPU run takes, proven where a CPU can: one batch shape under torch.compile (no recompile
after the first group), --offload from pinned memory with the next block prefetched, --fp8 on the block linears
only and refused below compute capability 8.9, a full-size preset refused on a CPU, no global RNG side effects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from apple_video.config import load_preset, with_overrides
from apple_video.errors import DeviceError, UserError, WeightsError
from apple_video.models import transformer as T
from apple_video.models.lora import load_lora, save_lora
from apple_video.models.offload import pin
from apple_video.models.pipeline import ApplePipeline, build_tiny, refuse_on_cpu
from apple_video.weights import ModelFiles

META = torch.device("meta")


def _crops(astronaut: np.ndarray, n: int) -> np.ndarray:
    return np.stack([np.ascontiguousarray(astronaut[10 * i:10 * i + 128, 20 * i:20 * i + 128]) for i in range(n)])


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, 32, 16, generator=torch.Generator().manual_seed(3)), torch.zeros(1, 32, 16)


@torch.no_grad()
def test_compiled_run_keeps_one_batch_shape_and_never_recompiles(astronaut: np.ndarray) -> None:
    """Groups of 3, 3, 2, 1 crops (a trailing group, frames without faces): the first group compiles every variant
    (full pass, condition-cache write and read); the rest pad to 3 rows and reuse those graphs exactly."""
    from torch._dynamo.utils import counters

    preset = with_overrides(load_preset("tiny"), independent_condition=True, inversion_steps=2, sampling_steps=2,
                            recipe="inversion")
    eager = ApplePipeline.from_preset(preset, torch.device("cpu"))
    pipe = ApplePipeline.from_preset(preset, torch.device("cpu"))
    id_embed, null = _ids()
    crops = _crops(astronaut, 3)
    torch._dynamo.reset()
    counters.clear()
    pipe.transformer.compile_blocks(True, backend="eager")
    try:
        pipe.swap_latents(crops, id_embed, null, [0, 1, 2])
        graphs = counters["stats"]["unique_graphs"]
        frames = counters["frames"]["total"]
        assert graphs >= 2  # double and single block kinds at least
        for n in (3, 2, 1):
            out = pipe.swap_latents(crops[:n], id_embed, null, list(range(n)))
            assert out.shape[0] == n
            assert torch.allclose(out, eager.swap_latents(crops[:n], id_embed, null, list(range(n))), atol=1e-5)
        # dynamo's frame count is every compile, first or re-: none after the first group
        assert counters["frames"]["total"] == frames and counters["stats"]["unique_graphs"] == graphs
        bigger = pipe.swap_latents(_crops(astronaut, 5), id_embed, null, list(range(5)))  # split into 3 + 2
        assert bigger.shape[0] == 5 and counters["frames"]["total"] == frames
        pipe._compiled_batch = 2  # another batch shape (what unpadded groups bring) compiles again
        pipe.swap_latents(crops[:2], id_embed, null, [0, 1])
        assert counters["frames"]["total"] > frames
    finally:
        pipe.transformer.compile_blocks(False)
        torch._dynamo.reset()


def test_uncompiled_runs_are_not_padded(astronaut: np.ndarray) -> None:
    pipe = ApplePipeline.from_preset(with_overrides(load_preset("tiny"), inversion_steps=1, sampling_steps=1),
                                     torch.device("cpu"))
    assert not pipe.transformer.compiled and pipe._fixed_batch(2) == 2 and pipe._fixed_batch(5) == 5


def test_fp8_takes_the_block_linears_only() -> None:
    transformer, _, _, _ = build_tiny(load_preset("tiny"))
    chosen = [name for name, module in transformer.named_modules() if T.fp8_filter(module, name)]
    block_linears = [name for name, module in transformer.named_modules() if isinstance(module, nn.Linear)
                     and name.startswith(T.BLOCK_PREFIXES) and "lora_" not in name]
    assert chosen == block_linears and chosen
    assert "transformer_blocks.0.attn.to_q.base_layer" in chosen and "single_transformer_blocks.0.proj_out.base_layer" in chosen
    for excluded in ("x_embedder", "context_embedder", "time_text_embed", "proj_out", "norm_out", "pulid", "lora_"):
        assert not any(name.startswith(excluded) or f".{excluded}" in name.split("blocks.")[0] for name in chosen)
    assert not any("lora_" in name for name in chosen)


def test_fp8_below_compute_capability_8_9_is_one_line(monkeypatch) -> None:
    for ok in ((8, 9), (9, 0), (10, 0)):
        T.check_fp8_capability(ok)
    with pytest.raises(UserError) as info:
        T.check_fp8_capability((8, 0), "NVIDIA A100-SXM4-80GB")
    assert "\n" not in str(info.value) and "8.9" in str(info.value) and "8.0" in str(info.value)
    # the refusal comes before torchao is needed, on the device the run asked for
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    transformer, _, _, _ = build_tiny(load_preset("tiny"))
    with pytest.raises(UserError, match="Tesla T4 is 7.5"):
        T.speed_up(transformer, False, True, torch.device("cuda"))


def test_full_size_model_is_refused_on_the_cpu_in_one_line(tmp_path: Path, monkeypatch, source_photo: Path) -> None:
    with torch.device("meta"):
        full = T.AppleFluxTransformer(idformer={}, pulid_num_ca=20)
    params = sum(p.numel() for p in full.parameters())
    with pytest.raises(DeviceError) as info:
        refuse_on_cpu(params, torch.device("cpu"))
    assert "\n" not in str(info.value) and "CUDA" in str(info.value)
    refuse_on_cpu(params, torch.device("cuda"))  # a GPU run goes on
    # through the real loader: a FLUX folder whose transformer is full size, no shards at all (never read)
    home = tmp_path / "home"
    flux = home / "FLUX.1-Krea-dev"
    (flux / "transformer").mkdir(parents=True)
    (flux / "model_index.json").write_text("{}")
    (flux / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    from safetensors.torch import save_file

    pulid = home / "pulid" / "pulid_flux_v0.9.1.safetensors"
    pulid.parent.mkdir(parents=True)
    save_file({"pulid_ca.0.to_q.weight": torch.zeros(2048, 3072), "pulid_ca.0.norm1.weight": torch.zeros(2048)},
              str(pulid))
    monkeypatch.setenv("APPLE_VIDEO_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    transformer, _, _, _ = build_tiny(load_preset("tiny"))
    lora = save_lora(transformer, tmp_path / "lora.safetensors")
    with pytest.raises(DeviceError, match="B parameters"):
        ApplePipeline.from_preset(load_preset("krea-512"), torch.device("cpu"), lora=lora,
                                  files=ModelFiles.resolve(["flux-krea-dev", "pulid-flux-v0.9.1"]))
    # and on the command line: one line, exit 2, before the clip is even read
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "APPLE_VIDEO_HOME": str(home), "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, str(root / "cli.py"), "swap", str(source_photo), str(source_photo), "-o", str(tmp_path / "o.png"), "--preset", "krea-512",
                             "--lora", str(lora), "--device", "cpu"], cwd=root, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-800:]
    assert "B parameters" in result.stderr


def test_pinning_is_guarded_where_no_driver_exists() -> None:
    tensor = torch.arange(6.0)
    pinned, ok = pin(tensor)
    assert torch.equal(pinned, tensor)
    assert ok == pinned.is_pinned()
    if not torch.cuda.is_available():
        assert not ok  # no driver: the pageable tensor, no crash


@torch.no_grad()
def test_offload_prefetches_the_next_block(astronaut: np.ndarray) -> None:
    """Each block is copied once per forward, the next one issued before the current one runs (the last block's
    successor is the next forward's first); between calls every weight is back in host memory."""
    pipe = ApplePipeline.from_preset(with_overrides(load_preset("tiny"), inversion_steps=1, sampling_steps=1), META,
                                     offload=True)
    offloader = pipe.transformer.offloader
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    order = []
    issue = offloader._issue
    offloader._issue = lambda i: (order.append(i), issue(i))[1]
    inputs_ok = pipe.swap_latents(_crops(astronaut, 1), torch.zeros(1, 32, 16), torch.zeros(1, 32, 16), [0])
    assert inputs_ok.device == META
    n = len(blocks)
    assert order[: n + 1] == [0, *range(1, n), 0]  # block 0 on demand, then always one ahead, wrapping to 0
    assert 0 in offloader._ahead
    assert all(p.device.type == "cpu" for block in blocks for p in block.parameters())
    assert offloader.pinned == torch.cuda.is_available()


def test_building_the_tiny_model_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_tiny(load_preset("tiny"))
    assert torch.equal(torch.rand(3), expected)
    first, _, _, _ = build_tiny(load_preset("tiny"))
    again, _, _, _ = build_tiny(load_preset("tiny"))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True))


def test_load_lora_does_not_rewrite_the_model_config(tmp_path: Path) -> None:
    student, _, _, _ = build_tiny(with_overrides(load_preset("tiny"), independent_condition=True))
    path = save_lora(student, tmp_path / "default.safetensors")
    plain, _, _, _ = build_tiny(load_preset("tiny"))
    with pytest.raises(WeightsError, match="independent_condition"):
        load_lora(plain, path)
    assert not plain.config.independent_condition

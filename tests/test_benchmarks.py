"""benchmarks/gpu.py on a machine without CUDA: it refuses in one line, and its model builder works on meta."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu import build_full_transformer, flops_per_forward, forward_inputs

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the benchmark would run")
def test_gpu_benchmark_refuses_without_cuda() -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert "needs a CUDA GPU" in result.stderr


def test_full_size_model_builds_on_meta_and_counts_its_flops() -> None:
    """The krea-512 architecture as the benchmark builds it: 12.70 B parameters (FLUX.1 12 B + PuLID + LoRA 64),
    no memory; a forward at 512 (1024 image + 1024 condition + 512 text tokens) is ~39 TFLOP."""
    meta = torch.device("meta")
    model = build_full_transformer(meta)
    params = list(model.parameters())
    assert all(p.device == meta and p.dtype == torch.bfloat16 for p in params)
    assert len(model.transformer_blocks) == 19 and len(model.single_transformer_blocks) == 38 and len(model.pulid_ca) == 20
    assert 12.6e9 < sum(p.numel() for p in params) < 12.8e9
    assert any("lora_A" in name for name, _ in model.named_parameters())
    flops = flops_per_forward(model, forward_inputs(1, meta, torch.bfloat16))
    assert 35e12 < flops < 43e12


@pytest.mark.slow
def test_gpu_acceptance_phases_run_at_toy_size_on_the_cpu(tmp_path: Path) -> None:
    """`--smoke`: the acceptance run's phases at toy size on the CPU, one JSON line each, then the table."""
    import json

    out = tmp_path / "acceptance.jsonl"
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--smoke", "--out", str(out), "--only",
                             "guard,compile,offload,train"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["phase"] for r in records] == ["build", "guard", "compile", "offload", "train"]
    assert all(r["status"] == "PASS" for r in records), records
    compiled = records[2]
    assert compiled["recompiles_after"] == 0 and compiled["compiles_first_group"] > 0
    assert records[3]["equal"] and records[4]["stepped"]
    assert "| phase | result |" in result.stdout and "acceptance: PASS" in result.stdout and result.returncode == 0

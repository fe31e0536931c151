"""benchmarks/gpu.py on a machine without CUDA: it refuses in one line, and its model builder works on meta."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
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


def test_acceptance_fits_the_device_command() -> None:
    """The phase limits, with install, imports and start-up, end inside the script's own timeout, which ends
    inside the device's 600 s command cap with room for the wheel install and the copies back."""
    import re

    from benchmarks.gpu import NEEDS_MODEL, PHASES

    script = (ROOT / "scripts" / "gpu_acceptance.sh").read_text()
    run_limit = int(re.search(r"^RUN_LIMIT=(\d+)", script, re.M).group(1))
    limits = sum(limit for _, _, limit in PHASES)
    assert limits + 60 <= run_limit <= 540
    names = [name for name, _, _ in PHASES]
    assert names.index("compile") < names.index("swap") and NEEDS_MODEL <= set(names)


def test_results_go_under_out_where_it_is_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from benchmarks.gpu import default_out

    monkeypatch.setenv("OUT", str(tmp_path))
    assert default_out() == tmp_path / "gpu-acceptance.jsonl"
    monkeypatch.delenv("OUT")
    assert default_out() == Path("gpu-acceptance.jsonl")


def test_goal_rows_and_transformer_calls() -> None:
    """The swap goals are per face-frame at the quality's full step count: balanced is 10 transformer calls for the
    inversion recipe and 5 for the student, fast 5 and 3 (FireFlow's N steps are N + 1 calls)."""
    from benchmarks.gpu import _calls, _preset, goal

    assert {q: _calls(_preset("inversion", q, None)) for q in ("balanced", "fast")} == {"balanced": 10, "fast": 5}
    assert {q: _calls(_preset("student", q, None)) for q in ("balanced", "fast")} == {"balanced": 5, "fast": 3}
    assert goal(0.69, 0.7)["status"] == "PASS" and goal(0.71, 0.7)["status"] == "FAIL"
    assert goal(0.61, 0.6, at_most=False)["status"] == "PASS" and goal(None, 0.6, at_most=False)["status"] == "FAIL"


def test_patch_detector_finds_the_synthetic_face_without_weights() -> None:
    """The engine phase's detector: the clip's own face patch by template matching, at the placement's scale."""
    import skimage

    from benchmarks.gpu import patch_detector_factory
    from tests import synth

    photo = skimage.data.astronaut()
    patch = synth.face_patch(photo, synth.ASTRONAUT_FACE_BOX)
    x0, y0, x1, y1 = synth.ASTRONAUT_FACE_BOX
    margin = int((x1 - x0) * 0.6)
    detector = patch_detector_factory(patch, (margin, margin, margin + x1 - x0, margin + y1 - y0))(None)
    path = synth.smooth_path(5, 640, 360, patch.shape[1])
    for frame, where in zip(synth.face_frames(patch, (640, 360), path), path, strict=True):
        (face,) = detector.detect(frame)
        centre = (face.bbox[:2] + face.bbox[2:]) / 2
        assert abs(centre[0] - where.cx) < 12 and abs(centre[1] - where.cy) < 12
        assert abs((face.bbox[2] - face.bbox[0]) / (x1 - x0) - where.scale) < 0.15
    (source,) = detector.detect(photo)
    assert np.allclose(source.bbox, synth.ASTRONAUT_FACE_BOX, atol=12)
    assert detector.detect(np.full((360, 640, 3), 90, np.uint8)) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the device half would run")
def test_device_half_of_the_script_refuses_without_cuda() -> None:
    result = subprocess.run(["bash", "scripts/gpu_acceptance.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "OUT": "/nonexistent"})
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "no CUDA GPU" in result.stderr

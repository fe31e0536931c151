"""Training on several processes, as README's `accelerate launch` command runs it: here 2 CPU processes over gloo
(`--multi_gpu` picks accelerate's torchrun launcher; without it accelerate starts one process on a machine
without GPUs)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from tests.test_training import prepared, raw_faces  # noqa: F401  (module fixtures: the toy data set)
from training.config import load_train_config
from training.stages import make_pseudo_labels

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "train"


def _launch(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "cli", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_two_processes_train_to_the_end_and_resume(prepared: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "run"
    args = ["train", "teacher", "--config", str(CONFIGS / "tiny_teacher.yaml"), "--data", str(prepared), "--output", str(out)]
    first = _launch(*args, "--steps", "6")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("teacher LoRA:") == 1  # one process reports (and writes)
    state = json.loads((out / "checkpoint-6" / "state.json").read_text())
    assert len(state["losses"]) == 6 and [s for s, _ in state["val"]] == [5, 6]
    lora_6 = load_file(str(out / "default.safetensors"))
    resumed = _launch(*args, "--steps", "8")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("resuming from") == 2  # both processes continue from checkpoint-6
    state = json.loads((out / "checkpoint-8" / "state.json").read_text())
    assert len(state["losses"]) == 8 and state["losses"][:6] == json.loads((out / "checkpoint-6" / "state.json").read_text())["losses"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["default.safetensors"]
    assert not list(out.glob(".*tmp*")) and (out / "loss.png").is_file()
    lora_8 = load_file(str(out / "default.safetensors"))
    assert lora_8.keys() == lora_6.keys() and any(not torch.equal(lora_8[k], lora_6[k]) for k in lora_8)


def _pairs(folder: Path) -> list[tuple[str, ...]]:
    """Every pair made, as (target identity, source identity, digests of the target, pseudo-label and source)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = []
    for name in manifest["shards"]:
        arrays = {k: np.load(folder / name / f"{k}.npy") for k in ("identity", "source_identity", "target", "pseudo", "src_image")}
        for i in range(len(arrays["target"])):
            rows.append((name, str(arrays["identity"][i]), str(arrays["source_identity"][i]),
                         *(hashlib.sha256(arrays[k][i].tobytes()).hexdigest() for k in ("target", "pseudo", "src_image"))))
    return rows


def test_pseudo_labels_from_two_processes_equal_one(prepared: Path, tmp_path: Path) -> None:  # noqa: F811
    from apple_video.config import load_preset
    from apple_video.models.lora import save_lora
    from apple_video.models.pipeline import ApplePipeline

    teacher = save_lora(ApplePipeline.from_preset(load_preset("tiny"), torch.device("cpu"), lora="fresh").transformer,
                        tmp_path / "teacher.safetensors")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process (OMP_NUM_THREADS=1): the same float sums, the same pixels
    try:
        one = make_pseudo_labels(load_train_config(CONFIGS / "tiny_pseudo_labels.yaml", data=prepared,
                                                   output=tmp_path / "one", teacher_lora=teacher))
    finally:
        torch.set_num_threads(threads)
    result = _launch("train", "pseudo-labels", "--config", str(CONFIGS / "tiny_pseudo_labels.yaml"), "--data",
                     str(prepared), "--output", str(tmp_path / "two"), "--teacher-lora", str(teacher))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("pseudo-labels: /") == 1
    log = result.stdout + result.stderr
    assert "process 0 of 2: 1 of 2 shards" in log and "process 1 of 2: 1 of 2 shards" in log  # each its own shard
    ours, theirs = _pairs(one), _pairs(tmp_path / "two")
    assert len(ours) == 12 and len(set(theirs)) == len(theirs)  # none lost, none made twice
    assert sorted(theirs) == sorted(ours)

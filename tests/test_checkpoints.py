"""The one checkpoint reader: every file that does not read is one WeightsError in the caller's words."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from apple_video import weights
from apple_video.errors import WeightsError


def test_torch_and_safetensors_files_read_on_the_cpu(tmp_path: Path) -> None:
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(tensors, tmp_path / "a.pth")
    save_file(tensors, str(tmp_path / "a.safetensors"))
    for name in ("a.pth", "a.safetensors"):
        loaded = weights.load_checkpoint(tmp_path / name, "unused")
        assert torch.equal(loaded["w"], tensors["w"]) and loaded["w"].device.type == "cpu"


def test_a_truncated_file_is_one_error_with_its_type_and_hint(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1000)}, tmp_path / "a.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "a.pth").read_bytes()[:2000])
    with pytest.raises(WeightsError) as caught:
        weights.load_checkpoint(tmp_path / "cut.pth", "cut.pth is not readable", hint="; download it again")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert str(caught.value).startswith("cut.pth is not readable (RuntimeError); download it again (run ")
    (tmp_path / "cut.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match=r"^LoRA cut \(\w+\) \(run "):
        weights.load_checkpoint(tmp_path / "cut.safetensors", "LoRA cut")


def test_only_the_named_error_types_are_turned(tmp_path: Path) -> None:
    (tmp_path / "objects.pth").write_bytes(pickle.dumps({"w": object()}))
    with pytest.raises(pickle.UnpicklingError):  # the caller decides (the occlusion loader checks the hash)
        weights.load_checkpoint(tmp_path / "objects.pth", "x", errors=(RuntimeError, OSError, EOFError))
    with pytest.raises(WeightsError, match=r"^shape \(KeyError: 'stem'\) \(run "), \
            weights.refused_as("shape", detail=lambda e: f"{type(e).__name__}: {e}"):
        {}["stem"]

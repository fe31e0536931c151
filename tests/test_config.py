from pathlib import Path

import pytest

from apple_video.config import available_presets, load_preset, with_overrides
from apple_video.errors import ConfigError


def test_presets_load() -> None:
    assert {"tiny", "krea-512"} <= set(available_presets())
    tiny = load_preset("tiny")
    assert tiny.model.kind == "tiny" and tiny.model.transformer["num_layers"] == 3
    real = load_preset("krea-512")
    assert real.sampling.inversion_steps == 28 and real.sampling.sampling_steps == 28
    assert real.sampling.crop_size == 512 and real.model.lora_rank == 64


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: {kind: tiny}\nsampling: {crop_sise: 64}\n")
    with pytest.raises(ConfigError, match="unknown key 'sampling.crop_sise'"):
        load_preset(path)


def test_bad_value_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: {kind: tiny}\nsampling: {inversion_steps: -3}\n")
    with pytest.raises(ConfigError, match="bad value for 'sampling.inversion_steps'"):
        load_preset(path)
    with pytest.raises(ConfigError, match="model.kind"):
        from apple_video.config import parse_preset

        parse_preset({"name": "x", "model": {"kind": "giant"}}, "inline")


def test_unknown_preset_and_overrides() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_preset("nope")
    tiny = with_overrides(load_preset("tiny"), inversion_steps=2, sampling_steps=2)
    assert tiny.sampling.inversion_steps == 2
    with pytest.raises(ConfigError, match="id_weight"):
        with_overrides(tiny, id_weight=-1.0)

"""Typed settings. Presets live in `apple_video/configs/<name>.yaml` (package data: an installed wheel has them);
unknown keys and bad values are errors naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from apple_video.errors import ConfigError

# inside the package, so that `pip install .` ships the presets (`configs/` in a checkout links here)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PulidSettings(_Strict):
    dim: int = 3072
    dim_head: int = 128
    heads: int = 16
    kv_dim: int = 2048
    double_interval: int = Field(2, ge=1)
    single_interval: int = Field(4, ge=1)
    id_tokens: int = 32
    idformer_dim: int = 1024
    idformer_depth: int = 10


class VaeSettings(_Strict):
    block_out_channels: list[int] = [128, 256, 512, 512]
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159


class PresetModel(_Strict):
    """A preset's `model:` section: which model files and architecture (the command line's model options are
    `settings.ModelOptions`)."""

    kind: Literal["tiny", "flux"]
    seed: int = 0
    flux: str | None = None
    lora: str | None = None
    pulid: str | None = None
    transformer: dict[str, Any] | None = None
    pulid_settings: PulidSettings = Field(default_factory=PulidSettings, alias="pulid_cfg")
    vae: VaeSettings = Field(default_factory=VaeSettings)
    lora_rank: int = Field(64, ge=1)
    text_tokens: int = Field(512, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    # GPU memory one more crop in a model call needs (activations + VAE decode), for `--batch-size auto`
    crop_memory_gib: float = Field(1.5, gt=0)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SamplingSettings(_Strict):
    crop_size: int = Field(512, ge=32)
    inversion_steps: int = Field(28, ge=1, le=1000)
    sampling_steps: int = Field(28, ge=1, le=1000)
    guidance: float = 1.0
    id_weight: float = Field(1.0, ge=0.0)
    id_guidance: float = Field(1.0, ge=0.0)
    second_order: bool = False
    independent_condition: bool = False
    recipe: Literal["student", "inversion"] = "inversion"
    null_id: Literal["encoder", "none"] = "encoder"  # unconditional id: IDFormer(zeros), or no id branch
    solver: Literal["euler", "fireflow"] = "euler"  # fireflow: second order, N + 1 velocities for N steps
    inversion_solver: Literal["euler", "fireflow"] | None = None  # None: the same as `solver`
    condition_cache: bool = True  # reuse condition K/V across steps when the model has independent_condition
    compile: bool = False  # torch.compile each block kind once (CUDA only)
    fp8: bool = False  # torchao float8 linears (CUDA only, needs torchao)


# --quality: what each level sets on top of the preset. `paper` is exactly the official settings.
QUALITY_SETTINGS: dict[str, dict[str, Any]] = {
    "paper": {"inversion_steps": 28, "sampling_steps": 28, "solver": "euler", "inversion_solver": None,
              "second_order": False, "condition_cache": False, "compile": False, "fp8": False},
    # 5 + 5 velocities: FireFlow at 4 steps is as close to paper as Euler at 8 (tests/test_quality.py)
    "balanced": {"inversion_steps": 4, "sampling_steps": 4, "solver": "fireflow", "inversion_solver": None,
                 "second_order": False, "condition_cache": True, "compile": True, "fp8": False},
    # 2 + 3 velocities: the least that keeps the inversion two steps deep and sampling second order
    "fast": {"inversion_steps": 2, "sampling_steps": 2, "solver": "fireflow", "inversion_solver": "euler",
             "second_order": False, "condition_cache": True, "compile": True, "fp8": False},
}


class Preset(_Strict):
    name: str
    model: PresetModel
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _format_validation_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    return f"{source}: bad value for '{key}': {first['msg']}"


def parse_preset(data: dict[str, Any], source: str) -> Preset:
    """Validate a raw mapping into a Preset, turning pydantic's report into one clear line."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    model = data.get("model")
    if isinstance(model, dict) and "pulid" in model and isinstance(model["pulid"], dict):
        # `pulid:` is a checkpoint name for real presets and a settings block for tiny ones.
        data = {**data, "model": {**{k: v for k, v in model.items() if k != "pulid"}, "pulid_cfg": model["pulid"]}}
    try:
        return Preset.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def load_preset(name_or_path: str | Path) -> Preset:
    """Load a preset by name (`tiny`, `krea-512`) or from a YAML file path."""
    path = Path(name_or_path)
    if path.suffix not in {".yaml", ".yml"}:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset '{name_or_path}' (available: {', '.join(available_presets())})")
    if not path.is_file():
        raise ConfigError(f"preset file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error.__class__.__name__})") from None
    return parse_preset(data or {}, str(path))


def with_quality(preset: Preset, quality: str | None) -> Preset:
    """The preset with a --quality level's sampling settings (None: the preset's own). The level's table is applied
    as it is, None values included: `paper` resets `inversion_solver` to None (the same solver as sampling)."""
    if quality is None:
        return preset
    if quality not in QUALITY_SETTINGS:
        raise ConfigError(f"unknown quality '{quality}' (choose from {', '.join(QUALITY_SETTINGS)})")
    return _replace_sampling(preset, QUALITY_SETTINGS[quality])


def with_overrides(preset: Preset, **sampling: Any) -> Preset:
    """Return a copy of the preset with command-line sampling overrides (None: the option was not given)."""
    return _replace_sampling(preset, {k: v for k, v in sampling.items() if v is not None})


def _replace_sampling(preset: Preset, changes: dict[str, Any]) -> Preset:
    if not changes:
        return preset
    merged = {**preset.sampling.model_dump(), **changes}
    try:
        new_sampling = SamplingSettings.model_validate(merged)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, "option")) from None
    return preset.model_copy(update={"sampling": new_sampling})

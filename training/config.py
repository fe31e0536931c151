"""Training stage settings (configs/train/*.yaml), validated with clear errors naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from apple_video.errors import ConfigError, UserError


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: Literal["teacher", "pseudo-labels", "student"]
    preset: str = "krea-512"
    data: Path  # prepare-data output (teacher, pseudo-labels) or pseudo-label folder (student)
    output: Path
    steps: int = Field(65000, ge=1)
    id_loss_start: int = Field(15000, ge=0)  # steps without the identity loss first
    id_loss_weight: float = Field(1.0, ge=0)
    id_loss_max_t: float = Field(0.35, ge=0, le=1)  # identity loss only where t <= this
    # auto: the official netarc when `apple-arcface` is present, else arcface_torch IResNet-50 (`arcface-r50`)
    id_loss_model: Literal["auto", "netarc", "iresnet50", "iresnet100", "tiny", "tiny-netarc"] = "auto"
    # the official trainer's LPIPS(vgg) term on the one-step estimate, computed inside its identity-loss block:
    # from `id_loss_start` on, like the identity loss
    lpips_weight: float = Field(1.0, ge=0)
    lpips_max_t: float = Field(0.35, ge=0, le=1)  # LPIPS only where t <= this
    lpips_backbone: Literal["vgg16", "random"] = "vgg16"  # random: tests and toy runs
    # identity tokens held on the device; the least recently used go to <output>/id_tokens/ and are read back from there
    id_cache_size: int = Field(4096, ge=1)
    drop_text: float = Field(0.1, ge=0, le=1)  # the prompt replaced by the empty prompt's embedding
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(4, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.001, ge=0)
    max_grad_norm: float = Field(0.5, gt=0)
    checkpoint_every: int = Field(1000, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    sample_every: int = Field(1000, ge=1)
    seed: int = 0
    drop_condition: float = Field(0.1, ge=0, le=1)
    drop_id: float = Field(0.1, ge=0, le=1)
    independent_condition: bool = False
    gradient_checkpointing: bool = True
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    init_lora: Path | None = None  # student: the teacher's default.safetensors
    # validation: this fraction of the identities held out (never trained on), scored every `val_every` steps on
    # `val_samples` fixed samples at each t of `val_t` with fixed noise; 0 = no validation
    val_fraction: float = Field(0.0, ge=0, lt=1)
    val_every: int = Field(1000, ge=1)
    val_samples: int = Field(8, ge=1)
    val_t: tuple[float, ...] = Field((0.1, 0.3, 0.5, 0.7, 0.9), min_length=1)
    lora_rank: int | None = None  # default: the preset's
    # pseudo-labels
    teacher_lora: Path | None = None
    pairs: int = Field(100000, ge=1)
    shard_size: int = Field(64, ge=1)
    inversion_steps: int | None = None


def load_train_config(path: str | Path, **overrides) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{path}: not valid YAML") from None
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"{path}: unknown key '{key}'") from None
        raise ConfigError(f"{path}: bad value for '{key}': {first['msg']}") from None


def load_stage_config(stage: str, config_path: str, **overrides) -> TrainConfig:
    """A stage's config with command-line overrides; refuses a config written for another stage."""
    cfg = load_train_config(config_path, **overrides)
    if cfg.stage != stage:
        raise UserError(f"{config_path} is a '{cfg.stage}' config, not '{stage}'")
    return cfg

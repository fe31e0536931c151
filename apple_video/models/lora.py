"""The condition-branch LoRA (peft, adapter "default"): add, save and load in diffusers' format."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from apple_video import weights
from apple_video.errors import InputError, WeightsError
from apple_video.media.paths import atomic_write

# OminiControl's target modules (x_embedder, double-block image-side modules, single-block modules).
LORA_TARGETS = (
    r"(.*x_embedder|.*(?<!single_)transformer_blocks\.[0-9]+\.norm1\.linear"
    r"|.*(?<!single_)transformer_blocks\.[0-9]+\.attn\.to_k|.*(?<!single_)transformer_blocks\.[0-9]+\.attn\.to_q"
    r"|.*(?<!single_)transformer_blocks\.[0-9]+\.attn\.to_v|.*(?<!single_)transformer_blocks\.[0-9]+\.attn\.to_out\.0"
    r"|.*(?<!single_)transformer_blocks\.[0-9]+\.ff\.net\.2|.*single_transformer_blocks\.[0-9]+\.norm\.linear"
    r"|.*single_transformer_blocks\.[0-9]+\.proj_mlp|.*single_transformer_blocks\.[0-9]+\.proj_out"
    r"|.*single_transformer_blocks\.[0-9]+\.attn.to_k|.*single_transformer_blocks\.[0-9]+\.attn.to_q"
    r"|.*single_transformer_blocks\.[0-9]+\.attn.to_v|.*single_transformer_blocks\.[0-9]+\.attn.to_out)"
)
ADAPTER = "default"
INDEPENDENT_KEY = "independent_condition"
PREFIX = "transformer."

logger = logging.getLogger(__name__)


def add_condition_lora(transformer, rank: int, adapter: str = ADAPTER, init: str | bool = "gaussian") -> None:
    """Inject an (unfused) LoRA on the condition-branch modules; r == alpha as OminiControl recommends."""
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=init, target_modules=LORA_TARGETS),
                            adapter_name=adapter)


def fresh_condition_lora(transformer, rank: int, adapter: str = ADAPTER, seed: int = 0) -> None:
    """A new LoRA to train from scratch (replacing any present): A Gaussian (std 1/rank, peft's "gaussian" init), B
    zero, so it starts as a no-op. A is drawn on the host from a private generator seeded with `seed`, module by
    module in name order: the same seed gives the same LoRA on any device, and torch's global generator is untouched."""
    if adapter in getattr(transformer, "peft_config", {}):
        transformer.delete_adapters(adapter)
    with torch.random.fork_rng(devices=[]):  # the new modules' default init draws from the global generator
        add_condition_lora(transformer, rank, adapter, init=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(transformer.named_parameters()):
            if name.endswith(f"lora_A.{adapter}.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) / rank)
            elif name.endswith(f"lora_B.{adapter}.weight"):
                param.zero_()


def lora_state_dict(transformer, adapter: str = ADAPTER) -> dict[str, torch.Tensor]:
    """diffusers format: `transformer.<module>.lora_A.weight` (adapter name stripped)."""
    state = get_peft_model_state_dict(transformer, adapter_name=adapter)
    return {f"{PREFIX}{key}": value.detach().contiguous().cpu() for key, value in state.items()}


LORA_PRESET_KEY = "apple_video_preset"  # the preset a LoRA was trained on, in its safetensors metadata


def lora_preset(path: str | Path) -> str | None:
    """The preset named in a LoRA file's metadata (written by `apple-video train`); None when it names none or
    cannot be read (loading it reports that)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(LORA_PRESET_KEY) or None
    except Exception:  # noqa: BLE001 - unreadable files are reported by load_lora
        return None


def save_lora(transformer, path: Path, adapter: str = ADAPTER, preset: str | None = None) -> Path:
    """Write the LoRA; its metadata records whether it was trained with independent_condition (which lets
    inference cache the condition K/V) and the preset it was trained on (`--lora` alone then picks it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    independent = "true" if transformer.config.independent_condition else "false"
    with atomic_write(path) as tmp:
        save_file(lora_state_dict(transformer, adapter), str(tmp),
                  metadata={"format": "pt", "apple_video": "condition-lora", INDEPENDENT_KEY: independent,
                            **({LORA_PRESET_KEY: preset} if preset else {})})
    return path


def lora_rank_of(state: dict[str, torch.Tensor]) -> int:
    for key, value in state.items():
        if key.endswith("lora_A.weight"):
            return int(value.shape[0])
    raise WeightsError("not a LoRA file: no lora_A weights found")


def trained_independent(path: Path) -> bool:
    """Whether a LoRA file's metadata says it was trained with independent_condition."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(INDEPENDENT_KEY) == "true"
    except Exception:  # unreadable files are reported by load_lora
        return False


def load_lora(transformer, path: Path, adapter: str = ADAPTER) -> None:
    """Load an APPLE teacher/student LoRA (`default.safetensors`, diffusers keys) into `adapter`."""
    if not path.is_file():
        raise InputError(f"LoRA file not found: {path}")
    raw = weights.load_checkpoint(path, f"LoRA file corrupt or unreadable: {path}")
    state = {key.removeprefix(PREFIX): value for key, value in raw.items()}
    if trained_independent(path) and not transformer.config.independent_condition:
        # condition tokens were trained to attend to themselves only; the model must be built that way
        raise WeightsError(f"{path.name} was trained with independent_condition: build the model with "
                           "independent_condition=True (ApplePipeline.from_preset does)")
    rank = lora_rank_of(state)
    existing = getattr(transformer, "peft_config", {}).get(adapter)
    if existing is not None and existing.r != rank:
        transformer.delete_adapters(adapter)
        existing = None
    if existing is None:
        add_condition_lora(transformer, rank, adapter)
    result = set_peft_model_state_dict(transformer, state, adapter_name=adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise WeightsError(f"LoRA file {path} does not fit this model ({len(unexpected)} unexpected keys, e.g. {unexpected[0]})")

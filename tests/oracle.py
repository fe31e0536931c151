"""Load the official APPLE code's recorded run (tests/data/oracle, see its README) into our classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from apple_video.models.lora import add_condition_lora
from apple_video.models.transformer import AppleFluxTransformer

ORACLE = Path(__file__).resolve().parent / "data" / "oracle"


def oracle_files() -> tuple[dict, dict[str, torch.Tensor]]:
    json_path, tensors_path = ORACLE / "apple_tiny_128.json", ORACLE / "apple_tiny_128.safetensors"
    if not tensors_path.is_file():
        pytest.fail(f"oracle files missing at {ORACLE} (they are part of the repository)")
    return json.loads(json_path.read_text()), load_file(str(tensors_path))


def oracle_models(cfg: dict, tensors: dict[str, torch.Tensor]) -> tuple[AppleFluxTransformer, AutoencoderKL]:
    tc, pc = cfg["configs"]["transformer_config"], cfg["configs"]["pulid_ca"]
    model = AppleFluxTransformer(**tc, pulid_dim_head=pc["dim_head"], pulid_heads=pc["heads"], pulid_kv_dim=pc["kv_dim"],
                                 pulid_double_interval=pc["double_interval"], pulid_single_interval=pc["single_interval"],
                                 pulid_num_ca=pc["num_modules"])
    add_condition_lora(model, cfg["configs"]["lora_config"]["r"])
    model.load_state_dict({k.removeprefix("transformer/"): v for k, v in tensors.items() if k.startswith("transformer/")},
                          strict=True)
    vae = AutoencoderKL(**cfg["configs"]["vae_config"])
    vae.load_state_dict({k.removeprefix("vae/"): v for k, v in tensors.items() if k.startswith("vae/")}, strict=True)
    return model.eval(), vae.eval()

"""Which APPLE preset a job runs and which weight files it needs: light (no torch), read by the driver and workers."""

from __future__ import annotations

from apple_video import weights
from apple_video.config import Preset, load_preset, with_overrides, with_quality
from apple_video.settings import ModelOptions


def apple_weights_present() -> bool:
    return all(weights.is_present(name) for name in ("flux-krea-dev", "apple-student", "pulid-flux-v0.9.1"))


def apple_preset(options: ModelOptions) -> Preset:
    """The APPLE preset a job runs (krea-512 unless asked), with the command line's sampling overrides."""
    preset = with_quality(load_preset(options.preset or "krea-512"), options.quality)
    return with_overrides(preset, inversion_steps=options.steps,
                          sampling_steps=options.steps, id_weight=options.id_weight, recipe=options.recipe,
                          second_order=options.second_order or None, fp8=options.fp8 or None)


def required_weights(preset: Preset, options: ModelOptions) -> list[str]:
    """Registry names of the files the preset's transformer needs (none for the tiny preset)."""
    if preset.model.kind == "tiny":
        return []
    needed = ["flux-krea-dev", preset.model.pulid or "pulid-flux-v0.9.1"]
    if options.lora is None:
        needed.append(preset.model.lora or "apple-student")
    return needed


def identity_weights(preset: Preset) -> list[str]:
    """The two networks of PuLID's identity input (none for the tiny preset)."""
    return [] if preset.model.kind == "tiny" else ["antelopev2-arcface", "eva02-clip-l-336"]


def apple_files(preset: Preset, options: ModelOptions) -> weights.ModelFiles:
    """For a planner: the files the preset needs (a WeightsError names the first missing one), with the BiSeNet
    parser its identity input uses when that is present."""
    from apple_video.faces.parsing import parser_files

    names = [*required_weights(preset, options), *identity_weights(preset)]
    return weights.ModelFiles.resolve(names) + parser_files("auto")


"""Pick the swapper: `auto` uses APPLE when its weights (or an explicit preset such as `tiny`) are available."""

from __future__ import annotations

import logging

from apple_video.config import Preset, load_preset, with_overrides
from apple_video.engine.settings import ModelOptions, SwapSettings
from apple_video.models import registry
from apple_video.swappers.base import Swapper

logger = logging.getLogger(__name__)


def apple_weights_present() -> bool:
    return all(registry.is_present(name) for name in ("flux-krea-dev", "apple-student", "pulid-flux-v0.9.1"))


def resolve_swapper_name(settings: SwapSettings) -> str:
    if settings.swapper != "auto":
        return settings.swapper
    if settings.model.preset is not None or settings.model.lora is not None or apple_weights_present():
        return "apple"
    return "classic"


def apple_preset(options: ModelOptions) -> Preset:
    """The APPLE preset a job runs (krea-512 unless asked), with the command line's sampling overrides."""
    return with_overrides(load_preset(options.preset or "krea-512"), inversion_steps=options.steps,
                          sampling_steps=options.steps, id_weight=options.id_weight, inversion=options.inversion,
                          second_order=options.second_order or None)


def required_weights(preset: Preset, options: ModelOptions) -> list[str]:
    """Registry names of the files the preset needs (none for the tiny preset)."""
    if preset.model.kind == "tiny":
        return []
    needed = ["flux-krea-dev", preset.model.pulid or "pulid-flux-v0.9.1"]
    if options.lora is None:
        needed.append(preset.model.lora or "apple-student")
    return needed


def crop_size_for(settings: SwapSettings) -> int:
    """The swapper's crop size without building it (the driver needs it; only workers load models)."""
    if resolve_swapper_name(settings) == "classic":
        from apple_video.swappers.classic import ClassicSwapper

        return ClassicSwapper().crop_size
    return apple_preset(settings.model).sampling.crop_size


def announce_swapper(settings: SwapSettings) -> None:
    """Say which swapper a job will use, and check that its weights are there, before any work starts."""
    name = resolve_swapper_name(settings)
    if name == "classic":
        if settings.swapper == "auto":
            logger.info("swapper: classic (APPLE weights not found; `apple-video weights where` shows where they go)")
        return
    preset = apple_preset(settings.model)
    for weight in required_weights(preset, settings.model):
        registry.require(weight)
    logger.info("swapper: apple (preset %s)", preset.name)
    if preset.model.kind == "tiny":
        logger.warning("the '%s' preset uses small random weights: it runs every stage but does not make a real swap",
                       preset.name)


def create_swapper(settings: SwapSettings) -> Swapper:
    """Build the swapper (loads its models); `announce_swapper` says which one, once, on the driver."""
    if resolve_swapper_name(settings) == "classic":
        from apple_video.swappers.classic import ClassicSwapper

        return ClassicSwapper(poisson=settings.classic_blend == "poisson")
    from apple_video.swap import AppleSwapper

    return AppleSwapper.from_options(settings.model)

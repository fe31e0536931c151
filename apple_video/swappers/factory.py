"""Pick the swapper: `auto` uses APPLE when its weights (or an explicit preset such as `tiny`) are available."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from apple_video.settings import SwapSettings, TrackSettings
from apple_video.swappers.base import Swapper
from apple_video.swappers.presets import apple_preset, apple_weights_present
from apple_video.weights import ModelFiles

logger = logging.getLogger(__name__)


def resolve_swapper_name(settings: SwapSettings, weights_present: Callable[[], bool] = apple_weights_present) -> str:
    """`auto`: APPLE when a preset or LoRA is named or `weights_present()` (default: APPLE's files on this disk)."""
    if settings.swapper != "auto":
        return settings.swapper
    if settings.model.preset is not None or settings.model.lora is not None or weights_present():
        return "apple"
    return "classic"


def crop_size_for(settings: SwapSettings) -> int:
    """The swapper's crop size without building it (the driver needs it; only workers load models)."""
    if resolve_swapper_name(settings) == "classic":
        from apple_video.swappers.classic import ClassicSwapper

        return ClassicSwapper().crop_size
    return apple_preset(settings.model).sampling.crop_size


CLASSIC_SMOOTHING = 4.0  # the classic swap's landmark One-Euro cutoff is this many times lower


def tracking_for(settings: SwapSettings) -> TrackSettings:
    """Landmark smoothing along tracks for this swapper. The classic swap keeps the target's own lips, mouth and
    chin, so a slow filter cannot make speech lag, while every bit of the detector's wobble moves the source's
    sharp detail; APPLE keeps the given settings (its FFHQ crops follow the mouth corners)."""
    if resolve_swapper_name(settings) != "classic":
        return settings.tracking
    return replace(settings.tracking, min_cutoff=settings.tracking.min_cutoff / CLASSIC_SMOOTHING)


def announce_swapper(settings: SwapSettings) -> None:
    """Say which swapper a job will use (the planner has checked its weights and device)."""
    name = resolve_swapper_name(settings)
    if name == "classic":
        if settings.swapper == "auto":
            logger.info("swapper: classic (APPLE weights not found; `apple-video weights where` shows where they go)")
        return
    preset = apple_preset(settings.model)
    logger.info("swapper: apple (preset %s)", preset.name)
    if preset.model.kind == "tiny":
        logger.warning("the '%s' preset uses small random weights: it runs every stage but does not make a real swap",
                       preset.name)


def create_swapper(settings: SwapSettings, files: ModelFiles = ModelFiles()) -> Swapper:
    """Build the swapper (loads its models from `files`, the ones the planner resolved); `announce_swapper` says
    which one, once, on the driver. `auto` is decided as the planner did, from `files` rather than the disk (APPLE's
    backbone is among them when the planner found APPLE's weights)."""
    if resolve_swapper_name(settings, lambda: "flux-krea-dev" in files) == "classic":
        from apple_video.swappers.classic import ClassicSwapper

        return ClassicSwapper(poisson=settings.classic_blend == "poisson")
    from apple_video.swappers.apple import AppleSwapper

    return AppleSwapper.from_options(settings.model, files)

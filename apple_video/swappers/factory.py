"""Pick the swapper: `auto` uses APPLE when its weights (or an explicit preset such as `tiny`) are available."""

from __future__ import annotations

import logging

from apple_video.engine.settings import SwapSettings
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


def create_swapper(settings: SwapSettings, announce: bool = True) -> Swapper:
    name = resolve_swapper_name(settings)
    if name == "classic":
        from apple_video.swappers.classic import ClassicSwapper

        if announce and settings.swapper == "auto":
            logger.info("swapper: classic (APPLE weights not found; `apple-video weights where` shows where they go)")
        return ClassicSwapper()
    from apple_video.swap import AppleSwapper

    swapper = AppleSwapper.from_options(settings.model, settings.seed)
    if announce:
        logger.info("swapper: apple (preset %s)", swapper.preset.name)
        if not swapper.real:
            logger.warning("the '%s' preset uses small random weights: it runs every stage but does not make a real swap",
                           swapper.preset.name)
    return swapper

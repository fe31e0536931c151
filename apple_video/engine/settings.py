"""Settings of one swap job, passed explicitly to every stage (no global state)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from apple_video.faces.detect import DetectorSettings
from apple_video.faces.mask import MaskSettings
from apple_video.faces.select import SelectorSettings
from apple_video.faces.track import TrackSettings
from apple_video.media.video import EncodeSettings

SwapperName = Literal["auto", "apple", "classic"]
SWAPPER_CHOICES: tuple[str, ...] = ("auto", "apple", "classic")
ExecutorName = Literal["local", "ray"]


@dataclass(frozen=True)
class ModelOptions:
    preset: str | None = None  # None: krea-512 when its weights exist
    steps: int | None = None
    id_weight: float | None = None
    inversion: bool = True
    device: str = "auto"
    lora: str | None = None  # a LoRA file (e.g. a student you trained) instead of the preset's
    second_order: bool = False


@dataclass(frozen=True)
class SwapSettings:
    swapper: SwapperName = "auto"
    classic_blend: Literal["feather", "poisson"] = "feather"
    model: ModelOptions = field(default_factory=ModelOptions)
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    selector: SelectorSettings = field(default_factory=SelectorSettings)
    tracking: TrackSettings = field(default_factory=TrackSettings)
    mask: MaskSettings = field(default_factory=MaskSettings)
    encode: EncodeSettings = field(default_factory=EncodeSettings)
    chunk_frames: int = 96
    batch_size: int = 4
    seed: int = 0
    executor: ExecutorName = "local"
    ray_address: str | None = None
    num_gpus: float = 0.0
    workers: int = 2
    trim_start: int | None = None
    trim_end: int | None = None
    force: bool = False

    @property
    def trimmed(self) -> bool:
        return self.trim_start is not None or self.trim_end is not None

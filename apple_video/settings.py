"""Settings records shared by every layer: detection, selection, tracking, masks, encoding, model and job.

They sit at the bottom of the package (they import nothing of ours) so that faces, media, swappers and the
engine all read the same records and no layer reaches up for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DetectorName = Literal["auto", "dlib", "dlib-cnn", "insightface"]
DETECTOR_CHOICES: tuple[str, ...] = ("auto", "dlib", "dlib-cnn", "insightface")


@dataclass(frozen=True)
class DetectorSettings:
    name: DetectorName = "auto"
    score: float = 0.5  # 0..1; dlib's SVM margin 0 maps to 0.5
    size: int = 640  # longest side the detector sees
    angles: tuple[int, ...] = (0,)
    embeddings: bool = True


MASK_REGIONS = ("skin", "left-eyebrow", "right-eyebrow", "left-eye", "right-eye", "glasses", "nose", "mouth",
                "upper-lip", "lower-lip")
# CelebAMask-HQ labels produced by BiSeNet (facexlib) for each region name.
REGION_LABELS = {"skin": [1], "left-eyebrow": [3], "right-eyebrow": [2], "left-eye": [5], "right-eye": [4],
                 "glasses": [6], "nose": [10], "mouth": [11], "upper-lip": [12], "lower-lip": [13]}


PARSER_CHOICES: tuple[str, ...] = ("auto", "bisenet", "landmarks")
# FaceFusion's --face-mask-types: box (landmark hull), region (--face-mask-regions, parsed when BiSeNet is present),
# occlusion (APPLE's DeepLabV3+: what covers the face stays the target's). Several are intersected.
MASK_TYPES: tuple[str, ...] = ("box", "occlusion", "region")


@dataclass(frozen=True)
class MaskSettings:
    parser: str = "auto"  # auto | bisenet | landmarks
    regions: tuple[str, ...] = MASK_REGIONS
    blur: float = 0.3  # fraction of the feather width relative to the face size
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, right, bottom, left, percent of crop size
    types: tuple[str, ...] = ("region", "occlusion")  # of MASK_TYPES; occlusion only where its model file is present


SelectorMode = Literal["reference", "one", "many"]
SELECTOR_MODES: tuple[str, ...] = ("reference", "one", "many")
SelectorOrder = Literal["large-small", "small-large", "left-right", "right-left", "top-bottom", "bottom-top"]
SELECTOR_ORDERS: tuple[str, ...] = ("large-small", "small-large", "left-right", "right-left", "top-bottom", "bottom-top")


@dataclass(frozen=True)
class SelectorSettings:
    mode: SelectorMode = "reference"
    order: SelectorOrder = "large-small"
    reference_frame_number: int | None = None  # None: the first frame that has a face
    reference_face_position: int = 0
    reference_face_distance: float = 0.3
    min_face_size: int = 24  # pixels; smaller faces are skipped and counted


@dataclass(frozen=True)
class TrackSettings:
    iou_threshold: float = 0.2
    max_gap: int = 5  # frames a track may miss and still be continued (and interpolated)
    min_cutoff: float = 1.0  # One-Euro: Hz; 1.5 let the detector's sub-pixel wobble through (classic swaps shimmered)
    beta: float = 0.05  # One-Euro: speed coefficient; 0.01 lagged a swaying head (classic flicker 1.56x the input, 1.25 now)
    d_cutoff: float = 1.0
    cut_threshold: float = 40.0  # mean grey-level change of a 16x16 thumbnail that marks a cut


@dataclass(frozen=True)
class EncodeSettings:
    codec: str = "libx264"
    crf: int = 18
    preset: str = "veryfast"
    pix_fmt: str | None = None


RecipeName = Literal["student", "inversion"]
RECIPES: tuple[str, ...] = ("student", "inversion")
BatchSize = int | Literal["auto"]

SwapperName = Literal["auto", "apple", "classic"]
SWAPPER_CHOICES: tuple[str, ...] = ("auto", "apple", "classic")
ExecutorName = Literal["local", "ray"]
QualityName = Literal["fast", "balanced", "paper"]
QUALITY_CHOICES: tuple[str, ...] = ("fast", "balanced", "paper")


@dataclass(frozen=True)
class ModelOptions:
    preset: str | None = None  # None: krea-512 when its weights exist
    steps: int | None = None
    id_weight: float | None = None
    recipe: RecipeName | None = None  # None: the preset's (student: seeded noise; inversion: invert, then sample)
    device: str = "auto"
    offload: bool = False  # keep the transformer's weights in host memory, stream them to the GPU per module
    lora: str | None = None  # a LoRA file (e.g. a student you trained) instead of the preset's
    second_order: bool = False
    quality: QualityName | None = None  # None: the preset's own sampling settings (krea-512: the paper's)
    fp8: bool = False  # torchao float8 linears on CUDA


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
    batch_size: BatchSize = "auto"  # crops per model call; auto: what the device's free memory holds
    seed: int = 0
    executor: ExecutorName = "local"
    ray_address: str | None = None
    num_gpus: float = 0.0
    workers: int = 2
    trim_start: int | None = None
    trim_end: int | None = None
    force: bool = False
    allow_no_faces: bool = False  # write the input through when no face is found, instead of failing

    @property
    def trimmed(self) -> bool:
        return self.trim_start is not None or self.trim_end is not None


IdentityModelName = Literal["auto", "dlib", "insightface"]
IDENTITY_MODEL_CHOICES: tuple[str, ...] = ("auto", "dlib", "insightface")


@dataclass(frozen=True)
class EvalSettings:
    """How `apple-video eval` scores a swap (every field is written into the report)."""

    identity_model: IdentityModelName = "auto"  # auto: insightface w600k when its weights exist, else dlib 128-D
    id_every: int = 8  # video: identity embeddings on every N-th frame (the costly part on CPU)
    flicker_every: int = 1  # video: flicker on every N-th pair of consecutive frames
    detector_size: int = 640  # longest side the (dlib) detector sees, as the swap's analyze stage
    fid_reference: str | None = None  # pairs: folder of real images for FID (None: no FID)
    fid_batch: int = 16

"""Settings records shared by every layer: detection, selection, tracking, masks, encoding, model and job.

They sit at the bottom of the package (they import nothing of ours) so that faces, media, swappers and the
engine all read the same records and no layer reaches up for them.

Every field declares, once, where it matters (`setting(..., scope=..., options=...)`): whether it changes the
output or only how a job runs, whether only the APPLE (or classic) swapper or only whole video jobs read it, and
which command-line options set it. The resume fingerprint, the run record, the "ignored with --swapper classic"
warning and the options a preview sheet leaves out are all derived from that (`output_record`,
`ignored_options`, `video_only_options`): adding an option is one field here plus its click declaration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, get_args

# A field's scope: any of these; a field with none of them changes the output whatever the swapper or input.
APPLE = "apple"  # read only by the APPLE swapper (named when given with --swapper classic)
CLASSIC = "classic"  # read only by the classic swapper (named when given with --swapper apple)
VIDEO = "video"  # read only by whole video / frame-folder jobs: a preview sheet or a still image does not use it
RUNTIME = "runtime"  # how a job runs, not what it writes: outside the resume fingerprint and the run record
SCOPES = (APPLE, CLASSIC, VIDEO, RUNTIME)


def setting(default: Any = MISSING, *, scope: tuple[str, ...] = (), options: tuple[str, ...] = (),
            default_factory: Any = MISSING) -> Any:
    """A settings field with its scope and the command-line options (click parameter names) that set it.
    The first option gives the value; the others also feed it (e.g. --no-inversion feeds the recipe)."""
    unknown = set(scope) - set(SCOPES)
    if unknown:
        raise ValueError(f"unknown setting scope {sorted(unknown)}")
    metadata = {"scope": frozenset(scope), "options": tuple(options)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class SettingField:
    """One leaf field of a settings record, with the scope it inherits from the records above it."""

    path: str  # dotted, e.g. "model.steps"
    scope: frozenset[str]
    options: tuple[str, ...]


def nested_record(f: dataclasses.Field) -> type | None:
    """The record type of a field that holds a nested settings record (None for a plain value)."""
    if f.default_factory is not MISSING:
        value = f.default_factory()
        return type(value) if dataclasses.is_dataclass(value) else None
    return type(f.default) if dataclasses.is_dataclass(f.default) else None


def setting_fields(record: type, prefix: str = "", inherited: frozenset[str] = frozenset()) -> Iterator[SettingField]:
    """Every leaf field of a settings record type, nested records walked (a nested record's scope applies to all
    of its fields)."""
    for f in dataclasses.fields(record):
        scope = inherited | f.metadata.get("scope", frozenset())
        nested = nested_record(f)
        if nested is not None:
            yield from setting_fields(nested, f"{prefix}{f.name}.", scope)
        else:
            yield SettingField(f"{prefix}{f.name}", scope, f.metadata.get("options", ()))


def output_record(settings: Any, media: Literal["video", "image"] = "video") -> dict[str, Any]:
    """The settings that change what a job writes, as nested plain data: the resume fingerprint of a video job
    and the run record of an image job (`media="image"` also leaves out what only video jobs read)."""
    dropped = {RUNTIME} if media == "video" else {RUNTIME, VIDEO}
    return _record(settings, frozenset(), dropped)


def _record(settings: Any, inherited: frozenset[str], dropped: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(settings):
        scope = inherited | f.metadata.get("scope", frozenset())
        if scope & dropped:
            continue
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = _record(value, scope, dropped)
        else:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def ignored_options(given: set[str] | frozenset[str], swapper: str, record: type | None = None) -> list[str]:
    """The options the user gave that the chosen swapper does not read, as flags (`--steps`)."""
    other = {"classic": APPLE, "apple": CLASSIC}.get(swapper)
    if other is None:
        return []
    fields = setting_fields(record or SwapSettings)
    names = [name for f in fields if other in f.scope for name in f.options if name in given]
    return [f"--{name.replace('_', '-')}" for name in dict.fromkeys(names)]


def video_only_options(record: type | None = None) -> tuple[str, ...]:
    """Options of whole video jobs (executor, chunks, trim, encoder...): a preview sheet does not offer them."""
    names = [name for f in setting_fields(record or SwapSettings) if VIDEO in f.scope for name in f.options]
    return tuple(dict.fromkeys(names))


DetectorName = Literal["auto", "dlib", "dlib-cnn", "insightface"]
DETECTOR_CHOICES: tuple[str, ...] = get_args(DetectorName)


@dataclass(frozen=True)
class DetectorSettings:
    name: DetectorName = setting("auto", options=("face_detector",))
    score: float = setting(0.5, options=("face_detector_score",))  # 0..1; dlib's SVM margin 0 maps to 0.5
    size: int = setting(640, options=("face_detector_size",))  # longest side the detector sees
    angles: tuple[int, ...] = setting((0,), options=("face_detector_angles",))
    embeddings: bool = True


MaskRegion = Literal["skin", "left-eyebrow", "right-eyebrow", "left-eye", "right-eye", "glasses", "nose", "mouth",
                     "upper-lip", "lower-lip"]
MASK_REGIONS: tuple[str, ...] = get_args(MaskRegion)
# CelebAMask-HQ labels produced by BiSeNet (facexlib) for each region name.
REGION_LABELS = {"skin": [1], "left-eyebrow": [3], "right-eyebrow": [2], "left-eye": [5], "right-eye": [4],
                 "glasses": [6], "nose": [10], "mouth": [11], "upper-lip": [12], "lower-lip": [13]}


ParserName = Literal["auto", "bisenet", "landmarks"]
PARSER_CHOICES: tuple[str, ...] = get_args(ParserName)
# FaceFusion's --face-mask-types: box (landmark hull), region (--face-mask-regions, parsed when BiSeNet is present),
# occlusion (APPLE's DeepLabV3+: what covers the face stays the target's). Several are intersected.
MaskType = Literal["box", "occlusion", "region"]
MASK_TYPES: tuple[str, ...] = get_args(MaskType)


@dataclass(frozen=True)
class MaskSettings:
    parser: ParserName = setting("auto", options=("face_parser",))
    regions: tuple[MaskRegion, ...] = setting(MASK_REGIONS, options=("face_mask_regions",))
    # fraction of the feather width relative to the face size
    blur: float = setting(0.3, options=("face_mask_blur",))
    # top, right, bottom, left, percent of crop size
    padding: tuple[int, int, int, int] = setting((0, 0, 0, 0), options=("face_mask_padding",))
    # occlusion only where its model file is present
    types: tuple[MaskType, ...] = setting(("region", "occlusion"), options=("face_mask_types",))


SelectorMode = Literal["reference", "one", "many"]
SELECTOR_MODES: tuple[str, ...] = get_args(SelectorMode)
SelectorOrder = Literal["large-small", "small-large", "left-right", "right-left", "top-bottom", "bottom-top"]
SELECTOR_ORDERS: tuple[str, ...] = get_args(SelectorOrder)


@dataclass(frozen=True)
class SelectorSettings:
    mode: SelectorMode = setting("reference", options=("face_selector_mode",))
    order: SelectorOrder = setting("large-small", options=("face_selector_order",))
    # None: the first frame that has a face
    reference_frame_number: int | None = setting(None, options=("reference_frame_number",))
    reference_face_position: int = setting(0, options=("reference_face_position",))
    reference_face_distance: float = setting(0.3, options=("reference_face_distance",))
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
    codec: str = setting("libx264", options=("output_video_encoder",))
    crf: int = setting(18, options=("output_video_quality",))
    preset: str = setting("veryfast", options=("output_video_preset",))
    pix_fmt: str | None = None


RecipeName = Literal["student", "inversion"]
RECIPES: tuple[str, ...] = get_args(RecipeName)
BatchSize = int | Literal["auto"]

SwapperName = Literal["auto", "apple", "classic"]
SWAPPER_CHOICES: tuple[str, ...] = get_args(SwapperName)
ExecutorName = Literal["local", "ray"]
EXECUTOR_CHOICES: tuple[str, ...] = get_args(ExecutorName)
QualityName = Literal["fast", "balanced", "paper"]
QUALITY_CHOICES: tuple[str, ...] = get_args(QualityName)
BlendName = Literal["feather", "poisson"]
BLEND_CHOICES: tuple[str, ...] = get_args(BlendName)


@dataclass(frozen=True)
class ModelOptions:
    # None: krea-512 when its weights exist
    preset: str | None = setting(None, scope=(APPLE,), options=("preset",))
    steps: int | None = setting(None, scope=(APPLE,), options=("steps",))
    id_weight: float | None = setting(None, scope=(APPLE,), options=("id_weight",))
    # None: the preset's (student: seeded noise; inversion: invert, then sample)
    recipe: RecipeName | None = setting(None, scope=(APPLE,), options=("recipe", "no_inversion"))
    device: str = setting("auto", options=("device",))
    # keep the transformer's weights in host memory, stream them to the GPU per module
    offload: bool = setting(False, scope=(APPLE, RUNTIME), options=("offload",))
    # a LoRA file (e.g. a student you trained) instead of the preset's
    lora: str | None = setting(None, scope=(APPLE,), options=("lora",))
    second_order: bool = setting(False, scope=(APPLE,), options=("second_order",))
    # None: the preset's own sampling settings (krea-512: the paper's)
    quality: QualityName | None = setting(None, scope=(APPLE,), options=("quality",))
    fp8: bool = setting(False, scope=(APPLE,), options=("fp8",))  # torchao float8 linears on CUDA


@dataclass(frozen=True)
class SwapSettings:
    """Everything a swap job reads. Nested records without a scope of their own (detector, selector, tracking,
    mask) change the output whatever the swapper; `tracking` and a few other fields have no option (not offered)."""

    swapper: SwapperName = setting("auto", options=("swapper",))
    classic_blend: BlendName = setting("feather", scope=(CLASSIC,), options=("classic_blend",))
    model: ModelOptions = setting(default_factory=ModelOptions)
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    selector: SelectorSettings = field(default_factory=SelectorSettings)
    tracking: TrackSettings = field(default_factory=TrackSettings)
    mask: MaskSettings = field(default_factory=MaskSettings)
    encode: EncodeSettings = setting(default_factory=EncodeSettings, scope=(VIDEO,))
    chunk_frames: int = setting(96, scope=(VIDEO,), options=("chunk_frames",))
    # crops per model call; auto: what the device's free memory holds
    batch_size: BatchSize = setting("auto", options=("batch_size",))
    seed: int = setting(0, options=("seed",))
    executor: ExecutorName = setting("local", scope=(VIDEO, RUNTIME), options=("executor",))
    ray_address: str | None = setting(None, scope=(VIDEO, RUNTIME), options=("ray_address",))
    num_gpus: float | None = setting(None, scope=(VIDEO,), options=("num_gpus",))  # per render actor on Ray; None: 1 where the cluster has GPUs
    workers: int | None = setting(None, scope=(VIDEO, RUNTIME), options=("workers",))  # render actors; None: one per GPU (per 2 CPUs without)
    trim_start: int | None = setting(None, scope=(VIDEO,), options=("trim_start",))
    trim_end: int | None = setting(None, scope=(VIDEO,), options=("trim_end",))
    force: bool = setting(False, scope=(RUNTIME,), options=("force",))
    # write the input through when no face is found, instead of failing (a preview sheet always shows them)
    allow_no_faces: bool = setting(False, scope=(VIDEO, RUNTIME), options=("allow_no_faces",))

    @property
    def trimmed(self) -> bool:
        return self.trim_start is not None or self.trim_end is not None


IdentityModelName = Literal["auto", "dlib", "insightface"]
IDENTITY_MODEL_CHOICES: tuple[str, ...] = get_args(IdentityModelName)


@dataclass(frozen=True)
class EvalSettings:
    """How `apple-video eval` scores a swap (every field is written into the report)."""

    identity_model: IdentityModelName = "auto"  # auto: insightface w600k when its weights exist, else dlib 128-D
    id_every: int = 8  # video: identity embeddings on every N-th frame (the costly part on CPU)
    flicker_every: int = 1  # video: flicker on every N-th pair of consecutive frames
    detector_size: int = 640  # longest side the (dlib) detector sees, as the swap's analyze stage
    fid_reference: str | None = None  # pairs: folder of real images for FID (None: no FID)
    fid_batch: int = 16

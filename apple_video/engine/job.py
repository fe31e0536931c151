"""From command-line options to one validated job: `plan_job(command, options) -> Job`, then `Job.run()`.

cli.py parses; this module decides, once for every command (swap, preview, eval pairs): the paths, what kind of
input the target is, option conflicts, the output and its encoder, the runtime (Ray, GPUs) and the weights the
swapper needs. All of it runs before any decode or model load. The Job is a frozen, picklable record of what will
run; `Job.run()` hands it to the chunk pipeline (videos, frame folders, batches) or to the still-image renderer
(images, preview frames, eval pairs).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from apple_video.errors import ConfigError, DeviceError, InputError, OutputError, UserError
from apple_video.media.images import is_image_path
from apple_video.media.kinds import input_kind
from apple_video.media.paths import check_output, check_writable
from apple_video.media.video import check_encoder, is_video_path
from apple_video.settings import (
    DETECTOR_CHOICES,
    MASK_REGIONS,
    EncodeSettings,
    EvalSettings,
    MaskSettings,
    SwapSettings,
    ignored_options,
    nested_record,
)
from apple_video.swappers.factory import announce_swapper, resolve_swapper_name
from apple_video.swappers.presets import apple_preset, identity_weights, required_weights
from apple_video.weights import ModelFiles

if TYPE_CHECKING:
    from apple_video.engine.batch import BatchPlan
    from apple_video.engine.clips import ClipPlan
    from apple_video.engine.factories import EngineFactories
    from apple_video.faces.types import SourceFace

logger = logging.getLogger(__name__)

Command = Literal["swap", "preview", "pairs"]
JobKind = Literal["video", "folder", "image", "batch", "pairs"]

# FaceFusion's detector names: the ones we have an equivalent for, and the rest (refused with our choices)
DETECTOR_ALIASES = {"scrfd": "insightface", "retinaface": "insightface"}
FACEFUSION_DETECTORS = ("many", "retinaface", "scrfd", "yolo_face", "yunet")


@dataclass(frozen=True)
class JobResult:
    lines: tuple[str, ...]  # what the command prints
    ok: bool = True  # False: some part failed (a batch clip)
    exit_code: int = 0  # when not ok: 2 when only bad inputs failed (refused in planning), else 1


@dataclass(frozen=True)
class Job:
    """A validated job: what runs, on what, with which settings (picklable: it can be sent to a worker)."""

    command: Command
    kind: JobKind
    sources: tuple[Path, ...]
    target: Path  # the input, or the pairs list of `eval pairs`
    output: Path
    settings: SwapSettings
    frames: int = 4  # preview: frames in the sheet
    evaluation: EvalSettings | None = None  # eval pairs: how the run is scored
    # what planning resolved from the inputs (derived from the fields above: not part of a Job's equality)
    faces: tuple[SourceFace, ...] = field(default=(), compare=False)  # the source photos' faces (swap, preview)
    clips: tuple[ClipPlan, ...] = field(default=(), compare=False)  # a video's or frame folder's plan
    batch: BatchPlan | None = field(default=None, compare=False)  # what a batch runs, refused, did earlier
    files: ModelFiles = field(default_factory=ModelFiles, compare=False)  # every model file it loads, checked once

    def factories(self) -> EngineFactories:
        """What the run builds its swapper and detectors with (passed down to every worker)."""
        from apple_video.engine.factories import EngineFactories

        return EngineFactories.for_settings(self.settings, self.files)

    def run(self, factories: EngineFactories | None = None) -> JobResult:
        """Run the job; its workers build their models with `factories` (default: `self.factories()`)."""
        announce_swapper(self.settings)  # missing weights fail here, before anything is read or written
        factories = factories or self.factories()
        if self.command == "preview":
            from apple_video.engine.preview import make_preview

            return JobResult((make_preview(list(self.sources), self.target, self.output, self.settings, self.frames,
                                           factories, self.faces),))
        if self.command == "pairs":
            from apple_video.evaluate.runner import run_pairs

            report = run_pairs(self.target, self.output, self.settings, self.evaluation or EvalSettings(),
                               self.settings.force, factories)
            return JobResult((report.summary(), f"report: {self.output / 'report.md'} (.json, .png)"))
        if self.kind == "batch" and self.batch is not None:
            return self._run_batch(self.batch, factories)
        from apple_video.engine import run

        if self.kind == "image":
            with run.output_errors(self.output):
                summary = run.swap_image(list(self.sources), self.target, self.output, self.settings, factories,
                                         self.faces)
            return JobResult((summary.line(),))
        [clip] = self.clips
        with run.output_errors(clip.output), run.job_lock(clip.output):
            summary = run.run_clips([clip], self.settings, raise_errors=True, factories=factories).summaries[0]
        return JobResult((summary.line(),))

    def _run_batch(self, plan: BatchPlan, factories: EngineFactories) -> JobResult:
        from apple_video.engine.batch import run_planned

        self.output.mkdir(parents=True, exist_ok=True)
        summaries = run_planned(plan, self.settings, factories).summaries
        failed = [s for s in summaries if s.status != "ok"]
        lines = [s.line() for s in summaries]
        lines.append(f"{len(summaries) - len(failed)} of {len(summaries)} clips done -> {self.output}"
                     f"{f' ({plan.duplicates} listed twice ran once)' if plan.duplicates else ''}")
        exit_code = 0 if not failed else 2 if all(s.refused for s in failed) else 1
        return JobResult(tuple(lines), ok=not failed, exit_code=exit_code)


def plan_job(command: Command, options: dict[str, Any], given: frozenset[str] | set[str] = frozenset()) -> Job:
    """Validate the options of one command and say what will run. `options` are click's parameters (`paths` for
    swap and preview, `pairs_file` for eval pairs); `given` names those typed on the command line (conflicts and
    ignored options are only named for those)."""
    planners: dict[str, Callable[[dict[str, Any], frozenset[str]], Job]] = {
        "swap": _plan_swap, "preview": _plan_preview, "pairs": _plan_pairs}
    if command not in planners:
        raise ValueError(f"unknown command {command!r}")
    return planners[command](dict(options), frozenset(given))


def _plan_swap(opts: dict[str, Any], given: frozenset[str]) -> Job:
    if opts.get("manifest"):
        if opts.get("paths") or opts["extra_sources"] or opts["target"]:
            raise UserError("--manifest names each row's source and target: give no other SOURCE or TARGET")
        sources, target, kind = [], Path(opts["manifest"]), "batch"
        check_sources(sources, target, opts["lora"])
    else:
        sources, target = split_paths(tuple(opts.get("paths", ())), opts["extra_sources"], opts["target"])
        check_sources(sources, target, opts["lora"])
        kind = input_kind(target)
    output = Path(opts["output"])
    check_conflicts(opts, given)
    check_output_for(kind, target, output, sources, opts["force"])
    check_encoding(kind, opts, output)
    warn_disk_space(target, output)
    settings = settings_from(resolve_runtime(opts))
    files = job_files(settings)
    return plan_inputs(Job("swap", kind, tuple(sources), target, output, settings, files=files))


def _plan_preview(opts: dict[str, Any], given: frozenset[str]) -> Job:
    sources, target = split_paths(tuple(opts.get("paths", ())), opts["extra_sources"], opts["target"])
    check_sources(sources, target, opts["lora"])
    kind = input_kind(target)
    if kind not in ("video", "image"):
        raise InputError(f"a preview samples frames of one video (or shows one image), not a {kind}: {target}")
    output = Path(opts["output"])
    if output.suffix.lower() != ".png":
        raise OutputError(f"the preview sheet is a PNG: {output}")
    check_conflicts(opts, given)
    check_output(output, [target, *sources], opts["force"])
    settings = settings_from(resolve_runtime(opts))
    files = job_files(settings)
    return plan_inputs(Job("preview", kind, tuple(sources), target, output, settings, frames=opts.get("count", 4),
                           files=files))


def plan_inputs(job: Job) -> Job:
    """The job with its inputs opened: the target probed (each clip of a batch: bad ones refused up front, one
    line each), each source photo read and its face found. Nothing is built or written yet."""
    from apple_video.engine.batch import items_for, plan_batch
    from apple_video.engine.clips import find_source_faces, plan_folder, plan_video, probe_video
    from apple_video.media.images import read_image

    settings = job.settings
    detector = job.factories().detector
    if job.kind == "batch":
        items = items_for(job.sources, job.target)
        if job.sources:  # one source for every clip: a bad photo fails the whole batch, once
            find_source_faces(job.sources, settings, detector)
        return dataclasses.replace(job, batch=plan_batch(items, job.output, settings, detector))
    if job.kind == "image":
        read_image(job.target)
    elif job.command == "preview":
        probe_video(job.target)
    faces = find_source_faces(job.sources, settings, detector)
    if job.command == "preview" or job.kind == "image":
        return dataclasses.replace(job, faces=faces)
    plan = plan_video if job.kind == "video" else plan_folder
    return dataclasses.replace(job, faces=faces, clips=(plan(job.sources, faces, job.target, job.output, settings),))


def _plan_pairs(opts: dict[str, Any], given: frozenset[str]) -> Job:
    from apple_video.evaluate.runner import read_pairs

    pairs_file = Path(opts["pairs_file"])
    check_sources([], pairs_file, opts["lora"])
    pairs = read_pairs(pairs_file)  # every line's photos exist and are images
    output = Path(opts["output"])
    check_conflicts(opts, given)
    check_output_for("folder", pairs_file, output, [], force=True)  # a run folder resumes: run.json decides
    settings = settings_from(resolve_runtime(opts))
    files = job_files(settings)
    evaluation = EvalSettings(identity_model=opts.get("identity_model", "auto"), id_every=opts.get("id_every", 8),
                              fid_reference=opts.get("fid_reference"))
    sources = tuple(dict.fromkeys(p.source for p in pairs))
    return Job("pairs", "pairs", sources, pairs_file, output, settings, evaluation=evaluation, files=files)


def detector_name(value: str) -> str:
    if value in DETECTOR_CHOICES:
        return value
    if value in DETECTOR_ALIASES:
        logger.info("face detector '%s' (FaceFusion): using %s, its SCRFD detector", value, DETECTOR_ALIASES[value])
        return DETECTOR_ALIASES[value]
    raise ConfigError(f"unknown --face-detector '{value}': choose one of {', '.join(DETECTOR_CHOICES)} "
                      f"(FaceFusion's scrfd and retinaface map to insightface; {', '.join(FACEFUSION_DETECTORS[3:])} "
                      f"and many are not available)")


def check_conflicts(opts: dict, given: frozenset[str] | set[str]) -> None:
    """Options that contradict each other: refuse the ones that would change what runs, warn about the ignored."""
    if opts.get("executor") == "local" and opts.get("ray_address"):
        raise ConfigError("--executor local contradicts --ray-address: drop one of them")
    swapper = opts.get("swapper")
    ignored = ignored_options(given, swapper) if swapper in ("classic", "apple") else []
    if ignored:
        kind = "APPLE model options" if swapper == "classic" else "classic swapper options"
        logger.warning("--swapper %s ignores %s (%s)", swapper, ", ".join(ignored), kind)
    if "face_detector_size" in given and opts.get("face_detector") == "insightface":
        logger.warning("--face-detector insightface looks at a fixed 640 px picture: --face-detector-size is ignored")


def job_files(settings: SwapSettings) -> ModelFiles:
    """Every model file the job loads, each checked once: the swapper's (`check_weights`), then the detector's,
    the face parser's and the occlusion net's (`support_files`)."""
    from apple_video.engine.factories import support_files

    return check_weights(settings) + support_files(settings)


def check_weights(settings: SwapSettings) -> ModelFiles:
    """The APPLE files a job needs (resolved once: the swapper loads them from what this returns), its preset and
    sampling overrides, and whether the model can run here, checked before anything is read or written."""
    if resolve_swapper_name(settings) != "apple":
        return ModelFiles()
    from apple_video.models.pipeline import check_speed_options

    check_speed_options(settings.model.offload, settings.model.fp8)  # before any file is looked up
    preset = apple_preset(settings.model)
    files = ModelFiles.resolve(required_weights(preset, settings.model))
    if settings.executor != "ray":  # on the cluster the model runs on the workers: their devices are checked there
        check_device(settings, files("flux-krea-dev") if preset.model.kind != "tiny" else None)
    return files + ModelFiles.resolve(identity_weights(preset))


def check_device(settings: SwapSettings, flux: Path | None) -> None:
    """--fp8 and a full-size model (its FLUX folder `flux`; None: the tiny preset) on this machine's device."""
    from apple_video.models.pipeline import check_fits_device, resolve_device

    device = resolve_device(settings.model.device)
    if settings.model.fp8:
        from apple_video.models.transformer import require_torchao

        require_torchao()  # a missing torchao is named on every machine
    if settings.model.fp8 and device.type != "cuda":
        raise DeviceError(f"--fp8 needs a CUDA GPU (Ada or Hopper); this run would use the {device.type}: "
                          f"leave --fp8 off")
    if flux is not None:  # a full-size model on a CPU is refused before any work starts
        check_fits_device(flux, device)


def warn_disk_space(target: Path, output: Path) -> None:
    """A rough check: chunks and the final file together take about twice the input at default quality."""
    import shutil

    folder = output if output.is_dir() else output.resolve().parent
    size = target.stat().st_size if target.is_file() else sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    free = shutil.disk_usage(folder).free
    if free < 2 * size:
        logger.warning("only %.1f GB free in %s for an input of %.1f GB: the job may run out of space",
                       free / 1e9, folder, size / 1e9)


def check_encoding(kind: str, opts: dict, output: Path) -> None:
    """Encoder, preset and container are tried on a tiny clip now, not after the whole analysis."""
    if kind not in ("video", "batch"):
        return
    suffix = output.suffix.lower() if kind == "video" else ".mp4"
    check_encoder(_encode(opts, Path(f"out{suffix}")), suffix)


def _encode(opts: dict, output: Path | None = None) -> EncodeSettings:
    from apple_video.engine.clips import video_encode

    return video_encode(opts["output_video_encoder"], opts["output_video_quality"], opts["output_video_preset"],
                        output or Path(opts["output"]))


def split_paths(paths: tuple[str, ...], extra_sources: tuple[str, ...], target: str | None = None) -> tuple[list[Path], Path]:
    if target is not None:
        sources = [Path(p) for p in (*extra_sources, *paths)]
        if not sources:
            raise UserError("missing SOURCE: give the source photo(s) with -s or before the target")
        return sources, Path(target)
    if not paths:
        raise UserError("missing arguments: give SOURCE... TARGET (e.g. `apple-video swap face.jpg clip.mp4 -o out.mp4`)")
    if len(paths) == 1 and not extra_sources:
        raise UserError("missing TARGET: give the source photo(s) first and the video/image/folder last")
    sources = [Path(p) for p in extra_sources] + [Path(p) for p in paths[:-1]]
    return sources, Path(paths[-1])


def check_sources(sources: list[Path], target: Path, lora: str | None = None) -> None:
    if lora and not Path(lora).is_file():
        raise InputError(f"LoRA file not found: {lora}")
    for source in sources:
        if not source.exists():
            raise InputError(f"source photo not found: {source}")
        if source.is_dir() or not is_image_path(source):
            raise InputError(f"source must be a photo (png/jpg/webp/tiff): {source}")
        if source.stat().st_size == 0:
            raise InputError(f"source photo is empty (0 bytes): {source}")
    if not target.exists():
        raise InputError(f"input not found: {target}")
    if target.is_file() and target.stat().st_size == 0:
        raise InputError(f"input is empty (0 bytes): {target}")


def check_output_for(kind: str, target: Path, output: Path, sources: list[Path], force: bool) -> None:
    from apple_video.engine.layout import job_dir_for, joined_earlier, remove_leftovers

    if kind == "image" and not is_image_path(output):
        raise OutputError(f"output of an image swap must be an image file (png/jpg/webp/tiff): {output}")
    if kind == "video" and not is_video_path(output):
        raise OutputError(f"output of a video swap must be a video file (mp4/mov/mkv/webm): {output}")
    remove_leftovers(output)  # a finished job's folder that a stopped run was deleting
    if kind in ("folder", "batch"):
        if output.resolve() == target.resolve():
            raise OutputError(f"output path equals the input: {output}")
        if output.exists() and not output.is_dir():
            raise OutputError(f"output must be a folder for a {kind} input: {output}")
        if not output.resolve().parent.is_dir():
            raise OutputError(f"output directory does not exist: {output.parent}")
        check_writable(output if output.is_dir() else output.resolve().parent)
        resumable = job_dir_for(output).exists()
        if kind == "folder" and output.is_dir() and any(output.iterdir()) and not (force or resumable):
            raise OutputError(f"output folder is not empty: {output} (use --force to overwrite)")
        return
    # an output its job folder joined: the run was stopped before removing the folder, the rerun finishes that
    check_output(output, [target, *sources], force or joined_earlier(output))


def recipe_from(opts: dict) -> str | None:
    """--recipe, with --no-inversion kept as the old spelling of --recipe student."""
    recipe = opts.get("recipe")
    if opts.get("no_inversion"):
        if recipe == "inversion":
            raise UserError("--no-inversion contradicts --recipe inversion (it means --recipe student)")
        return "student"
    return recipe


def preset_of_lora(lora: str | None) -> str | None:
    """The preset a --lora file was trained on (its metadata), when --preset is not given."""
    if not lora:
        return None
    from apple_video.models.lora import lora_preset

    preset = lora_preset(lora)
    if preset:
        logger.info("--lora %s was trained on the %s preset: using it (--preset overrides)", Path(lora).name, preset)
    return preset


def batch_size_from(value: str | int) -> int | str:
    """--batch-size: 'auto' or a whole number of crops per model call (1 or more)."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        size = int(value)
    except ValueError:
        raise UserError(f"--batch-size must be 'auto' or a whole number of crops (1 or more), not '{value}'") from None
    if size < 1:
        raise UserError(f"--batch-size must be 'auto' or 1 or more, not {size}")
    return size


# Fields whose value is not simply their option's: keyed by the field's dotted path. Every other field with
# `options` takes `opts[options[0]]` as it is.
CONVERTERS: dict[str, Callable[[dict], Any]] = {
    "detector.name": lambda opts: detector_name(opts["face_detector"]),
    "detector.angles": lambda opts: tuple(sorted({int(a) for a in opts["face_detector_angles"]})) or (0,),
    "mask.regions": lambda opts: tuple(opts["face_mask_regions"]) or MASK_REGIONS,
    "mask.padding": lambda opts: tuple(opts["face_mask_padding"]),
    "mask.types": lambda opts: tuple(opts.get("face_mask_types") or ()) or MaskSettings().types,
    "model.recipe": recipe_from,
    "model.preset": lambda opts: opts["preset"] or preset_of_lora(opts.get("lora")),
    "batch_size": lambda opts: batch_size_from(opts["batch_size"]),
    "encode.codec": lambda opts: _encode(opts).codec,
    "encode.crf": lambda opts: _encode(opts).crf,
    "encode.preset": lambda opts: _encode(opts).preset,
}


def settings_from(opts: dict, record: type = SwapSettings, prefix: str = "") -> Any:
    """The settings record from the options: each field from the options it declares; fields whose option the
    command does not offer (a preview has no --executor) keep their defaults."""
    values = {}
    for f in dataclasses.fields(record):
        nested = nested_record(f)
        if nested is not None:
            values[f.name] = settings_from(opts, nested, f"{prefix}{f.name}.")
            continue
        options = f.metadata.get("options", ())
        if options and options[0] in opts:
            path = f"{prefix}{f.name}"
            values[f.name] = CONVERTERS[path](opts) if path in CONVERTERS else opts[options[0]]
    return record(**values)


def _classic(opts: dict) -> bool:
    """Whether these options run the classic swapper (decided as the swapper factory decides it)."""
    return resolve_swapper_name(settings_from(opts)) == "classic"


def resolve_runtime(opts: dict) -> dict:
    """Options with the runtime decided: the executor, the Ray connection (made now, so an unreachable cluster
    fails before any work), the GPUs per actor."""
    opts = dict(opts)
    if "executor" in opts and opts["executor"] is None:
        opts["executor"] = "ray" if opts.get("ray_address") else "local"
    if opts.get("executor") == "ray" and opts.get("ray_address") not in (None, "", "local"):
        from apple_video.engine.executors import connect_ray

        connect_ray(opts["ray_address"])
    if "num_gpus" in opts and opts["num_gpus"] is None and opts.get("executor") == "local" and _classic(opts):
        opts["num_gpus"] = 0.0  # the classic swapper never uses a GPU (and importing torch costs ~2 s of start-up)
    elif "num_gpus" in opts:
        import torch

        if opts["num_gpus"] is None and opts.get("executor") == "local":
            opts["num_gpus"] = 1.0 if torch.cuda.is_available() else 0.0
        elif opts["num_gpus"] is not None and opts["num_gpus"] > 0 and not torch.cuda.is_available() and opts.get("ray_address") in (None, "local"):
            raise DeviceError("--num-gpus was given but CUDA is not usable on this machine (refusing to run on the CPU)")
    return opts

"""From command-line options to a validated job: paths, input kind, output checks, settings and runtime.

cli.py parses; this module decides. Everything here runs before any decode or model load.
"""

from __future__ import annotations

import logging
from pathlib import Path

from apple_video.errors import ConfigError, DeviceError, InputError, OutputError, UserError
from apple_video.media.images import IMAGE_EXTENSIONS, is_image_path
from apple_video.media.paths import check_output, check_writable
from apple_video.media.video import check_encoder, default_codec_for, is_video_path
from apple_video.settings import (
    DETECTOR_CHOICES,
    MASK_REGIONS,
    DetectorSettings,
    EncodeSettings,
    MaskSettings,
    ModelOptions,
    SelectorSettings,
    SwapSettings,
)

logger = logging.getLogger(__name__)

# FaceFusion's detector names: the ones we have an equivalent for, and the rest (refused with our choices)
DETECTOR_ALIASES = {"scrfd": "insightface", "retinaface": "insightface"}
FACEFUSION_DETECTORS = ("many", "retinaface", "scrfd", "yolo_face", "yunet")
# options that only the APPLE swapper reads; named when given with --swapper classic
APPLE_ONLY = ("preset", "steps", "id_weight", "lora", "second_order", "no_inversion", "recipe", "quality", "fp8",
              "offload")


def detector_name(value: str) -> str:
    if value in DETECTOR_CHOICES:
        return value
    if value in DETECTOR_ALIASES:
        logger.info("face detector '%s' (FaceFusion): using %s, its SCRFD detector", value, DETECTOR_ALIASES[value])
        return DETECTOR_ALIASES[value]
    raise ConfigError(f"unknown --face-detector '{value}': choose one of {', '.join(DETECTOR_CHOICES)} "
                      f"(FaceFusion's scrfd and retinaface map to insightface; {', '.join(FACEFUSION_DETECTORS[3:])} "
                      f"and many are not available)")


def check_conflicts(opts: dict, given: set[str]) -> None:
    """Options that contradict each other: refuse the ones that would change what runs, warn about the ignored."""
    if opts.get("executor") == "local" and opts.get("ray_address"):
        raise ConfigError("--executor local contradicts --ray-address: drop one of them")
    if opts.get("swapper") == "classic":
        ignored = [f"--{name.replace('_', '-')}" for name in APPLE_ONLY if name in given]
        if ignored:
            logger.warning("--swapper classic ignores %s (APPLE model options)", ", ".join(ignored))
    if opts.get("swapper") == "apple" and "classic_blend" in given:
        logger.warning("--swapper apple ignores --classic-blend")
    if "face_detector_size" in given and opts.get("face_detector") == "insightface":
        logger.warning("--face-detector insightface looks at a fixed 640 px picture: --face-detector-size is ignored")


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
    encode = video_encode(opts["output_video_encoder"], opts["output_video_quality"], opts["output_video_preset"],
                          Path(f"out{suffix}"))
    check_encoder(encode, suffix)


def video_encode(encoder: str | None, quality: int, preset: str, output: Path) -> EncodeSettings:
    codec = encoder or default_codec_for(output)
    crf = round(51 - quality * 0.51) if codec != "libvpx-vp9" else round(63 - quality * 0.63)
    return EncodeSettings(codec=codec, crf=crf, preset=preset)


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


def kind_of(target: Path) -> str:
    if target.is_dir():
        entries = [p for p in target.iterdir() if p.is_file()]
        if any(is_video_path(p) for p in entries) and not any(is_image_path(p) for p in entries):
            return "batch"
        return "folder"
    if target.suffix.lower() == ".txt":
        return "batch"
    if is_image_path(target):
        return "image"
    if is_video_path(target):
        return "video"
    raise InputError(f"unsupported input type '{target.suffix}' (videos: mp4/mov/mkv/webm/avi..., images: "
                     f"{'/'.join(e.strip('.') for e in IMAGE_EXTENSIONS)}, or a folder of frames)")


def check_output_for(kind: str, target: Path, output: Path, sources: list[Path], force: bool) -> None:
    from apple_video.engine.run import job_dir_for

    if kind == "image" and not is_image_path(output):
        raise OutputError(f"output of an image swap must be an image file (png/jpg/webp/tiff): {output}")
    if kind == "video" and not is_video_path(output):
        raise OutputError(f"output of a video swap must be a video file (mp4/mov/mkv/webm): {output}")
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
    check_output(output, [target, *sources], force)


def recipe_from(opts: dict) -> str | None:
    """--recipe, with --no-inversion kept as the old spelling of --recipe student."""
    recipe = opts.get("recipe")
    if opts.get("no_inversion"):
        if recipe == "inversion":
            raise UserError("--no-inversion contradicts --recipe inversion (it means --recipe student)")
        return "student"
    return recipe


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


def settings_from(opts: dict) -> SwapSettings:
    angles = tuple(sorted({int(a) for a in opts["face_detector_angles"]})) or (0,)
    regions = tuple(opts["face_mask_regions"]) or MASK_REGIONS
    return SwapSettings(
        swapper=opts["swapper"],
        classic_blend=opts["classic_blend"],
        model=ModelOptions(preset=opts["preset"], steps=opts["steps"], id_weight=opts["id_weight"],
                           recipe=recipe_from(opts), device=opts["device"], lora=opts["lora"],
                           second_order=opts["second_order"], offload=opts.get("offload", False),
                           quality=opts.get("quality"), fp8=opts.get("fp8", False)),
        detector=DetectorSettings(name=detector_name(opts["face_detector"]), score=opts["face_detector_score"],
                                  size=opts["face_detector_size"], angles=angles),
        selector=SelectorSettings(mode=opts["face_selector_mode"], order=opts["face_selector_order"],
                                  reference_frame_number=opts["reference_frame_number"],
                                  reference_face_position=opts["reference_face_position"],
                                  reference_face_distance=opts["reference_face_distance"]),
        mask=MaskSettings(parser=opts["face_parser"], regions=regions, blur=opts["face_mask_blur"], padding=tuple(opts["face_mask_padding"]),
                          types=tuple(opts.get("face_mask_types") or MaskSettings().types)),
        encode=video_encode(opts["output_video_encoder"], opts["output_video_quality"], opts["output_video_preset"],
                             Path(opts["output"])),
        chunk_frames=opts["chunk_frames"],
        batch_size=batch_size_from(opts["batch_size"]),
        seed=opts["seed"],
        executor=opts["executor"],
        ray_address=opts["ray_address"],
        num_gpus=opts["num_gpus"],
        workers=opts["workers"],
        trim_start=opts["trim_start"],
        trim_end=opts["trim_end"],
        force=opts["force"],
        allow_no_faces=opts.get("allow_no_faces", False),
    )


def resolve_runtime(opts: dict) -> None:
    if opts["executor"] is None:
        opts["executor"] = "ray" if opts["ray_address"] else "local"
    if opts["executor"] == "ray" and opts["ray_address"] not in (None, "", "local"):
        from apple_video.engine.executors import connect_ray

        connect_ray(opts["ray_address"])
    if opts["num_gpus"] is None:
        import torch

        opts["num_gpus"] = 1.0 if torch.cuda.is_available() else 0.0
    elif opts["num_gpus"] > 0:
        import torch

        if not torch.cuda.is_available() and opts["ray_address"] in (None, "local"):
            raise DeviceError("--num-gpus was given but CUDA is not usable on this machine (refusing to run on the CPU)")

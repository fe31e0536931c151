"""apple-video command line: parses and validates options, then calls one function per command."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import traceback
from pathlib import Path

import click

from apple_video import __version__
from apple_video.errors import AppleVideoError, InputError, UserError
from apple_video.settings import MASK_REGIONS, MASK_TYPES

logger = logging.getLogger("cli")

QUALITY_HELP = "0 (smallest) .. 100 (best); mapped to the encoder's CRF like FaceFusion (80 -> CRF 10)"


class _Formatter(logging.Formatter):
    """Plain messages for information, `warning:`/`error:` prefixes for the rest."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return message


def _setup_logging(verbose: int, quiet: bool) -> None:
    """Our own messages at INFO by default (which swapper, which detector); other libraries only warn."""
    import os

    # read by OpenCV and Ray's C++ core when they load (also in Ray workers): their native logs stay off the terminal
    os.environ.setdefault("OPENCV_LOG_LEVEL", "DEBUG" if verbose > 1 else "SILENT")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "debug" if verbose > 1 else "error")
    level = logging.ERROR if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose > 1 else max(level, logging.WARNING))
    for name in ("apple_video", "training", "cli"):
        logging.getLogger(name).setLevel(level)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="apple-video")
@click.option("-v", "--verbose", count=True, help="Debug output (-vv: also from libraries).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, debug: bool) -> None:
    """Swap a consenting person's face into videos, frame folders and images with APPLE
    (diffusion, FLUX.1-Krea + PuLID), or the classic landmark swapper when no model weights are present.

    Every output is tagged as synthetic media."""
    _setup_logging(verbose, quiet)
    ctx.obj = {"debug": debug}


class DetectorSize(click.ParamType):
    """A detector size as we write it (640) or as FaceFusion does (640x640)."""

    name = "N|NxN"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        width, _, height = str(value).lower().partition("x")
        if not width.isdigit() or (height and not height.isdigit()):
            self.fail(f"'{value}' is not a size like 640 or 640x640", param, ctx)
        size = max(int(width), int(height or width))
        if not 160 <= size <= 4096:
            self.fail(f"{size} is not in 160..4096", param, ctx)
        return size


def swap_options(leave_out: tuple[str, ...] = ()):
    """The swap options, less those named in `leave_out` (click parameter names)."""
    return lambda func: _add_swap_options(func, leave_out)


def _add_swap_options(func, leave_out: tuple[str, ...]):
    # from the settings records, not faces/: importing OpenCV here would load it before its logging is set
    from apple_video.media.video import VIDEO_CODECS
    from apple_video.settings import (
        BLEND_CHOICES,
        DETECTOR_CHOICES,
        EXECUTOR_CHOICES,
        MASK_REGIONS,
        MASK_TYPES,
        PARSER_CHOICES,
        QUALITY_CHOICES,
        RECIPES,
        SELECTOR_MODES,
        SELECTOR_ORDERS,
        SWAPPER_CHOICES,
    )

    options = [
        click.option("-s", "--source", "--source-paths", "extra_sources", multiple=True, type=click.Path(),
                     help="Source photo (repeatable); several photos are combined into one identity."),
        click.option("-t", "--target", "--target-path", "target", type=click.Path(), default=None,
                     help="The video/image/folder to swap into (instead of the last path)."),
        click.option("-o", "--output", "--output-path", required=True, type=click.Path(), help="Output file or folder."),
        click.option("--allow-no-faces", is_flag=True,
                     help="Write the input through unchanged when no face is found (default: fail with exit 2)."),
        click.option("--force", is_flag=True, help="Overwrite the output and start the job over (no resume)."),
        click.option("--swapper", type=click.Choice(SWAPPER_CHOICES), default="auto", show_default=True,
                     help="auto: APPLE when its weights (or --preset) are available, else classic."),
        click.option("--classic-blend", type=click.Choice(BLEND_CHOICES), default="feather", show_default=True,
                     help="Classic swapper: two-band blend of the inner face, faded in (feather), or blend its gradients (poisson)."),
        click.option("--preset", default=None, help="Model preset: krea-512 (real weights) or tiny (random, for tests)."),
        click.option("--steps", type=click.IntRange(1, 1000), default=None, help="Inversion and sampling steps."),
        click.option("--id-weight", type=click.FloatRange(0, 5), default=None, help="Identity strength (PuLID id_weight)."),
        click.option("--lora", type=click.Path(), default=None,
                     help="APPLE LoRA file to use instead of the preset's (e.g. a student you trained)."),
        click.option("--second-order", is_flag=True,
                     help="The official second-order inversion (two velocities per step). See --quality for FireFlow."),
        click.option("--recipe", type=click.Choice(RECIPES), default=None,
                     help="student: APPLE's own inference, seeded Gaussian noise (the same for every frame of a face "
                          "track), the target crop as condition, 28 steps. inversion: attribute-aware inversion of the "
                          "target (null id), then the same sampling; 28 + 28 steps, twice the time. Default: the "
                          "preset's (inversion for krea-512)."),
        click.option("--no-inversion", is_flag=True, help="Same as --recipe student (older spelling)."),
        click.option("--offload", is_flag=True,
                     help="For GPUs under ~32 GB: keep the transformer's weights in host memory and copy each layer to "
                          "the GPU as it runs (GPU memory: one layer plus activations, instead of ~24 GB). Costs the "
                          "weight transfer (~24 GB over PCIe, estimated seconds) at every model call: use large "
                          "batches."),
        click.option("--quality", type=click.Choice(QUALITY_CHOICES), default=None,
                     help="paper: the official 28 + 28 Euler steps; balanced / fast: fewer second-order (FireFlow) "
                          "steps, condition K/V cache where the LoRA allows it, compiled blocks on CUDA. "
                          "Default: the preset's own settings. --steps still overrides."),
        click.option("--fp8", is_flag=True, help="float8 linears on CUDA (needs torchao; changes outputs slightly)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Random seed (outputs are reproducible)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--face-detector", "--face-detector-model", "face_detector", default="auto", show_default=True,
                     help=f"{', '.join(DETECTOR_CHOICES)}; auto: insightface when its weights exist, else dlib. "
                          f"FaceFusion's scrfd and retinaface mean insightface."),
        click.option("--face-detector-score", type=click.FloatRange(0, 1), default=0.5, show_default=True),
        click.option("--face-detector-size", type=DetectorSize(), default="640", show_default=True,
                     help="Longest side the detector sees first (N or NxN); smaller faces get a finer pass."),
        click.option("--face-detector-angles", multiple=True, type=click.Choice(["0", "90", "180", "270"]),
                     default=("0",), show_default=True,
                     help="Also look for faces rotated by these angles (`--face-detector-angles 0 90 180 270`)."),
        click.option("--face-selector-mode", type=click.Choice(SELECTOR_MODES), default="reference", show_default=True,
                     help="reference: one chosen person tracked through the clip; one: one face per frame; many: all."),
        click.option("--face-selector-order", type=click.Choice(SELECTOR_ORDERS), default="large-small", show_default=True),
        click.option("--reference-frame-number", type=click.IntRange(0), default=None,
                     help="Frame to pick the reference face from (default: first frame with a face)."),
        click.option("--reference-face-position", type=click.IntRange(0), default=0, show_default=True,
                     help="K-th face of the reference frame, in --face-selector-order."),
        click.option("--reference-face-distance", type=click.FloatRange(0, 1), default=0.3, show_default=True,
                     help="Other tracks this close to the reference identity are swapped too."),
        click.option("--face-parser", type=click.Choice(PARSER_CHOICES), default="auto", show_default=True,
                     help="Face masks from BiSeNet parsing (local weights) or from landmarks; auto picks parsing if present."),
        click.option("--face-mask-regions", multiple=True, type=click.Choice(MASK_REGIONS),
                     help="Regions to replace (default all); leave out 'mouth' to keep the target's mouth."),
        click.option("--face-mask-types", multiple=True, type=click.Choice(MASK_TYPES),
                     help="Masks to intersect (default region occlusion): box (landmark hull), region "
                          "(--face-mask-regions), occlusion (keeps what covers the face; needs occlusion-deeplabv3)."),
        click.option("--face-mask-blur", type=click.FloatRange(0, 1), default=0.3, show_default=True),
        click.option("--face-mask-padding", nargs=4, type=click.IntRange(0, 100), default=(0, 0, 0, 0),
                     show_default=True, help="Top right bottom left, percent."),
        click.option("--output-video-encoder", type=click.Choice(VIDEO_CODECS), default=None,
                     help="Default libx264 (libvpx-vp9 for .webm). ffv1 or libx264rgb with quality 100 are lossless."),
        click.option("--output-video-quality", type=click.IntRange(0, 100), default=80, show_default=True, help=QUALITY_HELP),
        click.option("--output-video-preset", default="veryfast", show_default=True,
                     help="x264/x265 speed preset: ultrafast .. veryslow."),
        click.option("--executor", type=click.Choice(EXECUTOR_CHOICES), default=None,
                     help="local (in-process) or ray (Ray actors). Default: ray when --ray-address is given."),
        click.option("--ray-address", default=None, help="Ray cluster address ('auto' for a running cluster)."),
        click.option("--num-gpus", type=click.FloatRange(0), default=None,
                     help="GPUs per swap actor (fractional allowed). Default 1 when the Ray cluster has GPUs, else 0."),
        click.option("--workers", type=click.IntRange(1), default=None,
                     help="Swap actors on Ray. Default: one per GPU of the cluster (CPU-only: half its CPUs)."),
        click.option("--trim-start", "--trim-frame-start", "trim_start", type=click.IntRange(0), default=None,
                     help="First frame to keep (videos); the output starts there, audio cut to match."),
        click.option("--trim-end", "--trim-frame-end", "trim_end", type=click.IntRange(1), default=None,
                     help="Frame to stop before (videos)."),
        click.option("--chunk-frames", type=click.IntRange(1), default=96, show_default=True,
                     help="Frames per chunk: the unit of parallel work, memory and resume."),
        click.option("--batch-size", default="auto", show_default=True,
                     help="Face crops per model call, or auto: what the GPU's free memory holds (up to 16; 1-4 on CPU)."),
    ]
    for option in reversed(options):
        if _param_name(option) not in leave_out:
            func = option(func)
    return func


def _param_name(option) -> str:
    """The parameter name a click.option decorator declares (`--face-detector-model` -> face_detector)."""
    return option(lambda: None).__click_params__[0].name


def _given(ctx: click.Context, opts: dict) -> set[str]:
    """Options the user typed (not defaults): conflicts are only named for those."""
    return {name for name in opts if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}


def _run(job) -> None:
    """Run a planned job and print what it reports; exit 1 when part of it failed (a batch's clip)."""
    result = job.run()
    for line in result.lines:
        click.echo(line)
    if not result.ok:
        sys.exit(result.exit_code or 1)


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--manifest", type=click.Path(), default=None,
              help="A batch as a CSV: each row `source(s),target[,output name]` (sources separated by ';', paths "
                   "relative to the file); the outputs go to the -o folder.")
@swap_options()
@click.pass_context
def swap(ctx: click.Context, paths: tuple[str, ...], **opts) -> None:
    """Swap the face in SOURCE photo(s) into TARGET: a video, a folder of frames, an image,
    or a folder / .txt list of videos (batch).

    \b
      apple-video swap face.jpg clip.mp4 -o out.mp4
      apple-video swap face.jpg frames/ -o out_frames/
      apple-video swap face.jpg photo.jpg -o out.png
      apple-video swap face.jpg clips/ -o out/ --ray-address auto
      apple-video swap --manifest jobs.csv -o out/

    An interrupted video or folder job resumes when the same command is run again."""
    from apple_video.engine.job import plan_job

    _run(plan_job("swap", {**opts, "paths": paths}, _given(ctx, opts)))


def _video_only() -> tuple[str, ...]:
    from apple_video.settings import video_only_options

    return video_only_options()


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--frames", "count", type=click.IntRange(1, 16), default=4, show_default=True, help="Frames in the sheet.")
@swap_options(leave_out=_video_only())  # a sheet of a few frames: no executor, chunks, trim or encoder
@click.pass_context
def preview(ctx: click.Context, paths: tuple[str, ...], count: int, **opts) -> None:
    """Swap a few frames spread over a clip and write a before/after contact sheet (PNG)."""
    from apple_video.engine.job import plan_job

    _run(plan_job("preview", {**opts, "paths": paths, "count": count}, _given(ctx, opts)))


@cli.group()
def weights() -> None:
    """Which model files are present, where they go, and fetching them."""


@weights.command("check")
@click.option("--verify", is_flag=True, help="Also hash each file against its published sha256 (slow: GBs to read).")
def weights_check(verify: bool) -> None:
    """Report each model file as present, missing or corrupt (exit 1 if any is missing or corrupt)."""
    from apple_video import weights

    missing = 0
    for entry in weights.REGISTRY:
        state, path = weights.status(entry, verify_hash=verify)
        missing += state != "present"
        click.echo(f"{state:8s} {entry.name:20s} {path}")
    click.echo("all model files present" if not missing else
               f"{missing} missing: the classic swapper is used until they are present (`apple-video weights where`)")
    if missing:
        sys.exit(1)


@weights.command("where")
def weights_where() -> None:
    """Where each model file is looked for and how to get it."""
    from apple_video import weights

    click.echo(f"weights home: {weights.weights_home()}  (set APPLE_VIDEO_HOME to move it)")
    for entry in weights.REGISTRY:
        pinned = f"{entry.size:,} bytes, sha256 {entry.sha256[:12]}..." if entry.size and entry.sha256 else entry.hash_note
        click.echo(f"{entry.name:20s} -> {weights.candidates(entry)[0]}\n{'':20s}    {entry.purpose}; from "
                   f"{entry.describe_source()}{f' ({pinned})' if pinned else ''}"
                   f"{' (gated: accept the licence on huggingface.co and set HF_TOKEN)' if entry.gated else ''}")


@weights.command("download")
@click.argument("names", nargs=-1)
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for each server.")
def weights_download(names: tuple[str, ...], timeout: float) -> None:
    """Download model files from their published sources (resumable; size and sha256 checked)."""
    from apple_video.weights import download

    for line in download(list(names), timeout):
        click.echo(line)


@cli.group()
def train() -> None:
    """Train the APPLE teacher, make pseudo-labels, train the student (configs in configs/train/).

    \b
      apple-video prepare-data raw/ -o data/faces
      apple-video train teacher --config configs/train/teacher.yaml
      apple-video train pseudo-labels --config configs/train/pseudo_labels.yaml
      apple-video train student --config configs/train/student.yaml

    A killed stage resumes from its last checkpoint when run again."""


def _train_options(func):
    options = [
        click.option("--config", "config_path", type=click.Path(), required=True, help="Stage config (configs/train/*.yaml)."),
        click.option("--data", type=click.Path(), default=None, help="Override the config's data folder."),
        click.option("--output", "-o", type=click.Path(), default=None, help="Override the config's output folder."),
        click.option("--steps", type=click.IntRange(1), default=None, help="Override the number of optimizer steps."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@train.command("teacher")
@_train_options
def train_teacher_cmd(config_path: str, data: str | None, output: str | None, steps: int | None) -> None:
    """Conditional deblurring: condition = the target with its face blurred to 8x8, id = another image of the person."""
    from training.config import load_stage_config
    from training.stages import train_teacher

    trainer = train_teacher(load_stage_config("teacher", config_path, data=data, output=output, steps=steps))
    if trainer.accelerator.is_main_process:  # one line from several processes
        click.echo(f"teacher LoRA: {trainer.cfg.output / 'default.safetensors'} (last loss {trainer.history[-1]:.4f})")


@train.command("pseudo-labels")
@_train_options
@click.option("--teacher-lora", type=click.Path(), default=None, help="Override the teacher LoRA file.")
def train_pseudo_cmd(config_path: str, data: str | None, output: str | None, steps: int | None,
                     teacher_lora: str | None) -> None:
    """Teacher swaps target A to person B (attribute-aware inversion) -> (src of A, pseudo-label A->B, target A)."""
    from accelerate import PartialState

    from training.config import load_stage_config
    from training.stages import make_pseudo_labels

    cfg = load_stage_config("pseudo-labels", config_path, data=data, output=output, teacher_lora=teacher_lora)
    folder = make_pseudo_labels(cfg)
    if PartialState().is_main_process:  # the group make_pseudo_labels formed
        click.echo(f"pseudo-labels: {folder}")


@train.command("student")
@_train_options
@click.option("--init-lora", type=click.Path(), default=None, help="Override the teacher LoRA the student starts from.")
def train_student_cmd(config_path: str, data: str | None, output: str | None, steps: int | None,
                      init_lora: str | None) -> None:
    """Student: condition = the clean pseudo-label, id = another image of A, target = the real A."""
    from training.config import load_stage_config
    from training.stages import train_student

    trainer = train_student(load_stage_config("student", config_path, data=data, output=output, steps=steps,
                                          init_lora=init_lora))
    if trainer.accelerator.is_main_process:
        click.echo(f"student LoRA: {trainer.cfg.output / 'default.safetensors'} (last loss {trainer.history[-1]:.4f})")


@cli.command("prepare-data")
@click.argument("raw_dir", type=click.Path())
@click.option("-o", "--output", type=click.Path(), required=True, help="Prepared data folder (resumable).")
@click.option("--preset", default="krea-512", show_default=True, help="Crop size comes from the preset.")
@click.option("--identity-list", type=click.Path(), default=None, help="CSV `file,identity` for a flat folder.")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True, help="Parallel processes.")
@click.option("--shard-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--framing", type=click.Choice(["auto", "as-is", "align"]), default="auto", show_default=True,
              help="auto: images whose face already sits on the crop template (VGGFace2-HQ as distributed) are taken as "
                   "they are, others re-aligned; as-is / align: always.")
@click.option("--min-aesthetic", type=float, default=None,
              help="Targets are images whose LAION aesthetic score is above this; the others stay identity images "
                   "[default: 5.1 as the released teacher, off for the tiny preset; 0: off].")
@click.option("--irises", type=click.Choice(["auto", "mediapipe", "estimated"]), default="auto", show_default=True,
              help="Iris points: MediaPipe's iris model (with gaze; `mediapipe-iris` + ai-edge-litert), or estimated from "
                   "the eye contour; auto: the model when present.")
def prepare_data_cmd(raw_dir: str, output: str, preset: str, identity_list: str | None, workers: int, shard_size: int,
                     framing: str, min_aesthetic: float | None, irises: str) -> None:
    """Align, mask and cache a face data set (one folder per identity) for training."""
    from apple_video.config import load_preset
    from training.data import OFFICIAL_MIN_AESTHETIC, prepare_data

    chosen = load_preset(preset)
    size = chosen.sampling.crop_size
    if min_aesthetic is None and chosen.model.kind != "tiny":
        min_aesthetic = OFFICIAL_MIN_AESTHETIC
    manifest = prepare_data(Path(raw_dir), Path(output), size, Path(identity_list) if identity_list else None, workers,
                            shard_size, framing, min_aesthetic, irises)
    kept = sum(s["count"] for s in manifest["shards"])
    click.echo(f"{output}: {kept} faces in {len(manifest['shards'])} shards ({manifest['framed']['as-distributed']} taken "
               f"as distributed, {len(manifest['identity_only'])} below the aesthetic threshold kept as identity images only), "
               f"{len(manifest['skipped'])} images skipped")


class _EvalGroup(click.Group):
    """`apple-video eval SOURCE ORIGINAL SWAPPED` stays the short form of `apple-video eval clip ...`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["clip", *args]
        return super().parse_args(ctx, args)


def _eval_options(func):
    from apple_video.settings import IDENTITY_MODEL_CHOICES

    options = [
        click.option("--identity-model", type=click.Choice(IDENTITY_MODEL_CHOICES), default="auto", show_default=True,
                     help="auto: insightface w600k when its weights exist, else dlib 128-D (never the model APPLE "
                          "conditions on)."),
        click.option("--id-every", type=click.IntRange(1), default=8, show_default=True,
                     help="Videos: identity embeddings on every N-th frame (the costly part)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@cli.group("eval", cls=_EvalGroup)
def evaluate() -> None:
    """Identity, pose, expression, FID and temporal metrics, with readable reports.

    \b
      apple-video eval face.jpg clip.mp4 out.mp4 --report runs/clip   # one clip (or image)
      apple-video eval pairs pairs.csv -o runs/apple --preset krea-512 --fid-reference ffhq/
      apple-video eval report runs/apple/report.json runs/classic/report.json -o table.md"""


@evaluate.command("clip")
@click.argument("source", type=click.Path())
@click.argument("original", type=click.Path())
@click.argument("swapped", type=click.Path())
@click.option("--json", "json_path", type=click.Path(), default=None, help="Also write the report as JSON.")
@click.option("--report", "report_prefix", type=click.Path(), default=None,
              help="Write PREFIX.json, PREFIX.md and PREFIX.png (per-frame series and metric bars).")
@click.option("--pose-model", type=click.Choice(["auto", "hopenet", "landmarks"]), default="auto", show_default=True,
              help="auto: HopeNet (the paper's) when its weights exist, else the landmark fit.")
@_eval_options
def eval_clip(source: str, original: str, swapped: str, json_path: str | None, report_prefix: str | None,
              pose_model: str, identity_model: str, id_every: int) -> None:
    """Score SWAPPED against ORIGINAL (pose, expression, flicker; the FF++ 10-frame figures) and SOURCE (identity,
    and its variance over the clip)."""
    from apple_video.evaluate.clip import eval_files, evaluate_clip
    from apple_video.evaluate.report import write_all, write_json
    from apple_video.settings import EvalSettings

    for path in (source, original, swapped):
        if not Path(path).exists():
            raise InputError(f"input not found: {path}")
    files = eval_files(identity_model, pose_model)  # each model file checked once, before any work
    report = evaluate_clip(Path(source), Path(original), Path(swapped),
                           EvalSettings(identity_model=identity_model, id_every=id_every), pose_model, files)
    if json_path:
        write_json(report, Path(json_path))
    if report_prefix:
        click.echo("report: " + ", ".join(str(p) for p in write_all(report, Path(report_prefix))))
    click.echo(report.summary())


@evaluate.command("pairs")
@click.argument("pairs_file", type=click.Path())
@click.option("--fid-reference", type=click.Path(), default=None, help="Folder of real images to compute FID against.")
@_eval_options
@swap_options()
@click.pass_context
def eval_pairs(ctx: click.Context, pairs_file: str, fid_reference: str | None, identity_model: str, id_every: int,
               **opts) -> None:
    """Swap every `source,target` line of PAIRS_FILE (CSV or .txt) into -o FOLDER, then score the run
    (the paper's protocol). A rerun with the same settings resumes."""
    from apple_video.engine.job import plan_job

    options = {**opts, "pairs_file": pairs_file, "fid_reference": fid_reference, "identity_model": identity_model,
               "id_every": id_every}
    _run(plan_job("pairs", options, _given(ctx, opts)))


@evaluate.command("report")
@click.argument("reports", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", type=click.Path(), default=None, help="Write the table to this Markdown file.")
def eval_report(reports: tuple[str, ...], output: str | None) -> None:
    """Put several runs' report JSONs side by side in one Markdown table."""
    from apple_video.evaluate.report import compare_table, read_json

    table = compare_table([(Path(r).parent.name if Path(r).stem == "report" else Path(r).stem, read_json(Path(r)))
                           for r in reports])
    if output:
        Path(output).write_text(table)
    click.echo(table)


GLOBAL_FLAGS = ("-v", "-vv", "-vvv", "--verbose", "-q", "--quiet", "--debug")
NARGS_OPTIONS = {"--face-detector-angles": ("0", "90", "180", "270"), "--face-mask-types": MASK_TYPES,
                 "--face-mask-regions": MASK_REGIONS}


def _expand_nargs(argv: list[str]) -> list[str]:
    """FaceFusion's `--face-detector-angles 0 90 180` form: repeat the option for each value that follows it."""
    out: list[str] = []
    current, first = None, False
    for arg in argv:
        if current and arg in NARGS_OPTIONS[current]:
            out += [arg] if first else [current, arg]
            first = False
            continue
        current = arg if arg in NARGS_OPTIONS else None
        first = current is not None
        out.append(arg)
    return out


def _globals_first(argv: list[str]) -> list[str]:
    """Accept -v/-q/--debug anywhere on the line (`apple-video swap ... --debug`), as users type them."""
    if "--" in argv:
        cut = argv.index("--")
        head, tail = argv[:cut], argv[cut:]
    else:
        head, tail = argv, []
    flags = [a for a in head if a in GLOBAL_FLAGS]
    return flags + [a for a in head if a not in GLOBAL_FLAGS] + tail


class Terminated(KeyboardInterrupt):
    """SIGTERM (schedulers, `docker stop`) or SIGHUP (a closed terminal): stopped like Ctrl-C, exit 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def _stop_like_ctrl_c(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def _interrupted(error: BaseException | None) -> None:
    """One line, the finished chunks kept: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    click.echo("interrupted: run the same command again to resume", err=True)
    sys.exit(error.exit_code if isinstance(error, Terminated) else 130)


def main(argv: list[str] | None = None) -> None:
    argv = _expand_nargs(_globals_first(list(sys.argv[1:] if argv is None else argv)))
    debug = "--debug" in argv
    with _signals_stop_like_ctrl_c():
        _main(argv, debug)


@contextlib.contextmanager
def _signals_stop_like_ctrl_c():
    """SIGTERM and SIGHUP raise like Ctrl-C for the length of the command (handlers restored after: tests call
    `main` in-process; only the main thread may set them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _stop_like_ctrl_c) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _main(argv: list[str], debug: bool) -> None:
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.exceptions.Abort as error:  # click turns KeyboardInterrupt and EOFError into Abort
        if isinstance(error.__cause__, KeyboardInterrupt) or error.__cause__ is None:
            _interrupted(error.__cause__)
        if debug:
            traceback.print_exception(error.__cause__)
        cause = error.__cause__
        click.echo(f"internal error: {cause.__class__.__name__}: {cause} (run with --debug for the traceback)", err=True)
        sys.exit(1)
    except click.UsageError as error:
        click.echo(f"error: {error.format_message()}", err=True)
        sys.exit(2)
    except UserError as error:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    except AppleVideoError as error:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt as error:
        _interrupted(error)
    except Exception as error:  # noqa: BLE001 - the last line of defence: one line, exit 1
        if debug:
            traceback.print_exc()
        else:
            click.echo(f"internal error: {error.__class__.__name__}: {error} (run with --debug for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

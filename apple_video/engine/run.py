"""Swap jobs: plan -> analyze -> track/select -> render -> finish, resumable through a job folder."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path

import numpy as np

from apple_video.engine.executors import run_stage
from apple_video.engine.sources import (
    ChunkVideoSink,
    FolderMedia,
    FolderSink,
    VideoMedia,
    open_folder,
    open_video,
)
from apple_video.engine.stages import (
    Analyzer,
    Renderer,
    RenderGroup,
    RenderStats,
    face_from_dict,
    face_to_dict,
    prefetch,
    target_from_dict,
    target_to_dict,
    write_json,
)
from apple_video.engine.still import StillRenderer, load_sources, no_faces_message, source_detector
from apple_video.errors import NoFaceError, OutputError, UserError
from apple_video.faces.select import select_targets
from apple_video.faces.track import find_cuts, frame_signature
from apple_video.faces.types import SourceFace
from apple_video.media.images import list_frames, read_image, write_image
from apple_video.media.kinds import InputKind, input_kind
from apple_video.media.video import VideoInfo, concat_chunks, trim
from apple_video.progress import progress
from apple_video.settings import SwapSettings, output_record
from apple_video.swappers.factory import announce_swapper, create_swapper, crop_size_for, tracking_for

logger = logging.getLogger(__name__)


def batched(items, size: int):
    """Groups of `size` consecutive items (itertools.batched arrives in Python 3.12)."""
    iterator = iter(items)
    while group := list(islice(iterator, size)):
        yield group


@dataclass
class Summary:
    input: str
    output: str
    status: str = "ok"
    frames: int = 0
    frames_swapped: int = 0
    frames_passed_through: int = 0
    faces_swapped: int = 0
    faces_skipped: int = 0
    small_faces_skipped: int = 0
    chunks_resumed: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def line(self) -> str:
        if self.status != "ok":
            return f"{self.input}: FAILED: {self.error}"
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        return (f"{self.output}: {self.frames} frames, {self.faces_swapped} faces swapped in {self.frames_swapped} frames, "
                f"{self.frames_passed_through} passed through, {self.faces_skipped + self.small_faces_skipped} faces skipped"
                f"{f', {self.chunks_resumed} chunks resumed' if self.chunks_resumed else ''} ({stages})")


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs to open the job's media (picklable for Ray)."""

    kind: str  # "video" | "folder"
    input: Path
    output: Path
    job_dir: Path
    settings: SwapSettings
    info: VideoInfo | None = None
    frame_paths: tuple[Path, ...] = ()

    def media(self) -> VideoMedia | FolderMedia:
        return VideoMedia(self.info) if self.kind == "video" else FolderMedia(self.frame_paths)

    def chunk_file(self, chunk: int) -> Path:
        return self.job_dir / "chunks" / f"chunk_{chunk:05d}{self.output.suffix}"

    def analysis_file(self, chunk: int) -> Path:
        return self.job_dir / "analysis" / f"chunk_{chunk:05d}.json"

    def targets_file(self, chunk: int) -> Path:
        return self.job_dir / "targets" / f"chunk_{chunk:05d}.json"


def plan_chunks(frame_count: int, keyframes: tuple[int, ...], chunk_frames: int) -> list[tuple[int, int]]:
    """Cut [0, frame_count) about every `chunk_frames`, moving each cut to a keyframe when one is near."""
    keys = sorted(set(keyframes))
    cuts, position = [0], 0
    while position + chunk_frames < frame_count:
        target = position + chunk_frames
        near = [k for k in keys if target <= k < target + chunk_frames // 2]
        position = near[0] if near else target
        cuts.append(position)
    cuts.append(frame_count)
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


class AnalyzeWorker:
    """Stage 2 (parallel): decode a chunk and detect faces; writes the chunk's analysis JSON."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.media = spec.media()
        self.analyzer = Analyzer(spec.settings)

    def _frames(self, start: int, stop: int, signatures: dict[str, list]):
        """The chunk's frames, noting each one's thumbnail signature (for cut detection) on the way."""
        for index, pts, rgb in self.media.frames(start, stop):
            signatures[str(index)] = frame_signature(rgb).tolist()
            yield index, pts, rgb

    def __call__(self, batch: dict) -> dict:
        for chunk, start, stop in zip(batch["chunk"], batch["start"], batch["stop"], strict=True):
            signatures: dict[str, list] = {}
            faces = self.analyzer.analyze(self._frames(int(start), int(stop), signatures))
            write_json(self.spec.analysis_file(int(chunk)),
                       {"faces": {str(i): [face_to_dict(f) for f in fs] for i, fs in faces.items()}, "signatures": signatures})
        return {"chunk": batch["chunk"]}


class RenderWorker:
    """Stage 4 (parallel, GPU actors): swap + paste + encode one chunk."""

    def __init__(self, spec: JobSpec, sources: list[SourceFace]) -> None:
        self.spec = spec
        self.media = spec.media()
        self.renderer = Renderer(spec.settings, create_swapper(spec.settings), sources)

    def _sink(self, chunk: int):
        if self.spec.kind == "video":
            return ChunkVideoSink(self.spec.chunk_file(chunk), self.spec.info, self.spec.settings.encode)
        return FolderSink(self.media, self.spec.output)

    def _finish(self, group: RenderGroup, results: list, sink) -> RenderStats:
        rendered, stats = self.renderer.finish(group, results)
        for index, pts, rgb, swapped in rendered:
            sink.write(index, pts, rgb, swapped)
        return stats

    def _render_chunk(self, frames, targets: dict[int, list], sink) -> RenderStats:
        """Decode and crop the next group (prefetch thread) and paste and encode the previous one (finish thread)
        while the model swaps this one; groups are finished in order, so the output is the same as in sequence."""
        stats = RenderStats()
        groups = (self.renderer.prepare(list(group), targets) for group in batched(frames, self.renderer.batch_size))
        with closing(prefetch(groups, depth=1)) as ahead, ThreadPoolExecutor(1, thread_name_prefix="finish") as finisher:
            pending = None
            for group in ahead:
                results = self.renderer.swap(group)
                if pending is not None:
                    stats.add(pending.result())
                pending = finisher.submit(self._finish, group, results, sink)
            if pending is not None:
                stats.add(pending.result())
        return stats

    def __call__(self, batch: dict) -> dict:
        stats = RenderStats()
        for chunk, start, stop in zip(batch["chunk"], batch["start"], batch["stop"], strict=True):
            data = json.loads(self.spec.targets_file(int(chunk)).read_text())
            targets: dict[int, list] = {}
            for item in data:
                targets.setdefault(item["frame"], []).append(target_from_dict(item))
            sink = self._sink(int(chunk))
            stats.add(self._render_chunk(self.media.frames(int(start), int(stop)), targets, sink))
            sink.close()
        return {"chunk": batch["chunk"], **{k: [v] for k, v in asdict(stats).items()}}


def _fingerprint(path: Path, sources: list[Path], settings: SwapSettings) -> str:
    """What the job's output depends on: its input files (each frame of a frame folder: one edited in place is
    noticed) and the settings that change the output (`output_record`, from each field's declared scope)."""
    files = list_frames(path) if path.is_dir() else [path]
    parts = [str(path.resolve())]
    for p in [*files, *sources]:
        stat = p.stat()
        parts.append(f"{p.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    parts.append(json.dumps(output_record(settings), sort_keys=True, default=str))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def job_dir_for(output: Path) -> Path:
    if output.suffix:
        return output.parent / f".{output.name}.apple-video-job"
    return output / ".apple-video-job"


def lock_path_for(output: Path) -> Path:
    job_dir = job_dir_for(output)
    return job_dir.with_name(f"{job_dir.name}.lock")


@contextlib.contextmanager
def job_lock(output: Path):
    """One job per output: a second run on the same output refuses at once instead of redoing the work."""
    path = lock_path_for(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held for the whole job
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise OutputError(f"another apple-video job is writing {output} (pid {holder}); wait for it to finish "
                              f"or choose another -o") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()
        path.unlink(missing_ok=True)


_DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied", errno.EFBIG: "the file is too large for this file system or limit"}


def _remove_partials(output: Path) -> None:
    """Half-written files (temp names) of this job; finished chunks stay for the resume."""
    job_dir = job_dir_for(output)
    found = [*job_dir.rglob(".*.partial-*"), *job_dir.rglob(".*.tmp")] if job_dir.is_dir() else []
    if output.suffix:
        found += output.parent.glob(f".{output.stem}.partial-*{output.suffix}")
    elif output.is_dir():
        found += output.glob(".*.partial-*")
    for partial in found:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def output_errors(output: Path):
    """Output-side OS errors (full disk, read-only, no permission) are the user's to fix: one line, exit 2."""
    try:
        yield
    except OSError as error:
        code = getattr(error, "errno", None)
        written = output.parent if output.suffix else output
        name = getattr(error, "filename", None)
        elsewhere = name is not None and not str(Path(str(name)).resolve()).startswith(str(written.resolve()))
        if code not in _DISK_ERRORS or (code in (errno.EACCES, errno.EPERM) and elsewhere):
            raise  # e.g. an unreadable input: not a problem of the output
        _remove_partials(output)
        raise OutputError(f"cannot write {output}: {_DISK_ERRORS[code]}; "
                          f"free space or fix the folder, then run the same command again to resume") from None


def _open_manifest(job_dir: Path, key: str, chunks: list[tuple[int, int]], force: bool) -> dict:
    manifest_path = job_dir / "manifest.json"
    if force and job_dir.exists():
        shutil.rmtree(job_dir)
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") == key and manifest.get("chunks") == [list(c) for c in chunks]:
            return manifest
        logger.info("inputs or settings changed since the interrupted run: starting over")
        shutil.rmtree(job_dir)
    for sub in ("analysis", "targets", "chunks"):
        (job_dir / sub).mkdir(parents=True, exist_ok=True)
    manifest = {"key": key, "chunks": [list(c) for c in chunks], "analyzed": [], "rendered": [], "stats": {}}
    write_json(manifest_path, manifest)
    return manifest


def _items(chunks: list[tuple[int, int]], todo: list[int]) -> list[dict]:
    return [{"chunk": c, "start": chunks[c][0], "stop": chunks[c][1]} for c in todo]


def run_frames_job(spec: JobSpec, source_paths: list[Path], frame_count: int, fps: float,
                   keyframes: tuple[int, ...]) -> Summary:
    """The shared driver for videos and frame folders."""
    settings = spec.settings
    summary = Summary(str(spec.input), str(spec.output), frames=frame_count)
    chunks = plan_chunks(frame_count, keyframes, settings.chunk_frames)
    announce_swapper(settings)  # missing weights or a faceless source fail here, before any job file exists
    sources = load_sources(source_paths, source_detector(settings), crop_size_for(settings))
    manifest = _open_manifest(spec.job_dir, _fingerprint(spec.input, source_paths, settings), chunks, settings.force)
    manifest_path = spec.job_dir / "manifest.json"
    summary.chunks_resumed = len(manifest["rendered"])

    started = time.perf_counter()
    todo = [c for c in range(len(chunks)) if c not in manifest["analyzed"]]
    with progress(sum(chunks[c][1] - chunks[c][0] for c in todo), "analyze") as bar:
        for row in run_stage(AnalyzeWorker, (spec,), _items(chunks, todo), settings, gpu=False):
            chunk = int(row["chunk"])
            manifest["analyzed"].append(chunk)
            write_json(manifest_path, manifest)
            bar.update(chunks[chunk][1] - chunks[chunk][0])
    summary.seconds["analyze"] = time.perf_counter() - started

    started = time.perf_counter()
    detections: list[list] = [[] for _ in range(frame_count)]
    signatures: list = [None] * frame_count
    for c in range(len(chunks)):
        analysis = json.loads(spec.analysis_file(c).read_text())
        for index, faces in analysis["faces"].items():
            detections[int(index)] = [face_from_dict(f) for f in faces]
        for index, signature in analysis["signatures"].items():
            signatures[int(index)] = np.asarray(signature, np.float32)
    cuts = find_cuts(signatures, settings.tracking.cut_threshold)
    selection = select_targets(detections, fps, settings.selector, tracking_for(settings), cuts)
    summary.small_faces_skipped = selection.skipped_small
    if not any(selection.targets.values()) and not settings.allow_no_faces:
        raise NoFaceError(no_faces_message(spec.input, frame_count, detections, selection.skipped_small, settings))
    for c, (start, stop) in enumerate(chunks):
        write_json(spec.targets_file(c), [target_to_dict(t) for i in range(start, stop) for t in selection.targets.get(i, [])])
    summary.seconds["track"] = time.perf_counter() - started

    started = time.perf_counter()
    todo = [c for c in range(len(chunks)) if c not in manifest["rendered"]]
    with progress(sum(chunks[c][1] - chunks[c][0] for c in todo), "swap") as bar:
        for row in run_stage(RenderWorker, (spec, sources), _items(chunks, todo), settings, gpu=True):
            chunk = int(row["chunk"])
            manifest["rendered"].append(chunk)
            manifest["stats"][str(chunk)] = {k: int(row[k]) for k in ("frames", "swapped_frames", "faces_swapped", "faces_skipped")}
            write_json(manifest_path, manifest)
            bar.update(chunks[chunk][1] - chunks[chunk][0])
    summary.seconds["render"] = time.perf_counter() - started

    started = time.perf_counter()
    if spec.kind == "video":
        info = spec.info
        pts = [p - info.pts[0] for p in info.pts] if settings.trimmed else list(info.pts)
        window = None
        if settings.trimmed:
            start_s = float(info.pts[0] * info.time_base)
            window = (start_s, start_s + info.duration)
        concat_chunks([spec.chunk_file(c) for c in range(len(chunks))], spec.output, info.path if info.audio else None,
                      pts, info.time_base, info.rotation, window, rate=info.fps)
    stats = manifest["stats"].values()
    summary.frames_swapped = sum(s["swapped_frames"] for s in stats)
    summary.faces_swapped = sum(s["faces_swapped"] for s in stats)
    summary.faces_skipped = sum(s["faces_skipped"] for s in stats)
    summary.frames_passed_through = frame_count - summary.frames_swapped
    if summary.faces_swapped == 0:
        logger.warning("no face was swapped in %s: the output is the input re-encoded%s", spec.input,
                       "" if settings.allow_no_faces else " (the swapper skipped every face it was given)")
    shutil.rmtree(spec.job_dir, ignore_errors=True)
    summary.seconds["finish"] = time.perf_counter() - started
    return summary


def for_rotation(settings: SwapSettings, rotation: int) -> SwapSettings:
    """A clip with display rotation may have been filmed upright in its stored picture: unless angles were chosen,
    also look at the picture turned back by the rotation (only on frames where upright finds nothing)."""
    if not rotation or settings.detector.angles != (0,):
        return settings
    back = (360 - rotation) % 360
    logger.debug("display rotation %d: also looking for faces turned by %d degrees", rotation, back)
    return replace(settings, detector=replace(settings.detector, angles=(0, back)))


def swap_video(source_paths: list[Path], input_path: Path, output: Path, settings: SwapSettings) -> Summary:
    info = open_video(input_path).info
    if settings.trimmed:
        info = trim(info, settings.trim_start, settings.trim_end)
    settings = for_rotation(settings, info.rotation)
    spec = JobSpec("video", input_path, output, job_dir_for(output), settings, info=info)
    return run_frames_job(spec, source_paths, info.frame_count, float(info.fps), info.keyframes)


def swap_folder(source_paths: list[Path], input_path: Path, output: Path, settings: SwapSettings, fps: float = 25.0) -> Summary:
    media = open_folder(input_path)
    output.mkdir(parents=True, exist_ok=True)
    spec = JobSpec("folder", input_path, output, job_dir_for(output), settings, frame_paths=media.paths)
    return run_frames_job(spec, source_paths, media.frame_count, fps, (0,))


def swap_image(source_paths: list[Path], input_path: Path, output: Path, settings: SwapSettings) -> Summary:
    """One still image: detect, select, swap, paste (the shared still renderer), write with the synthetic tag."""
    started = time.perf_counter()
    data = read_image(input_path)
    renderer = StillRenderer(settings)
    renderer.use_sources(source_paths)
    result = renderer.render(data.rgb, input_path, settings.allow_no_faces)
    write_image(output, data, result.rgb)
    return Summary(str(input_path), str(output), frames=1, frames_swapped=int(result.swapped),
                   frames_passed_through=int(not result.swapped), faces_swapped=result.faces_swapped,
                   faces_skipped=result.faces_skipped, small_faces_skipped=result.small_faces_skipped,
                   seconds={"total": time.perf_counter() - started})


def swap_any(source_paths: list[Path], target: Path, output: Path, settings: SwapSettings,
             kind: InputKind | None = None) -> Summary:
    """One input of any single kind (video, frame folder, image; None: decided from the path), locked and with
    disk errors as one line."""
    kind = kind or input_kind(target)
    if kind == "batch":
        raise UserError(f"{target} is a batch (a folder or list of clips): swap it with `apple-video swap`")
    with output_errors(output):
        if kind == "image":
            return swap_image(source_paths, target, output, settings)
        with job_lock(output):
            if kind == "folder":
                return swap_folder(source_paths, target, output, settings)
            return swap_video(source_paths, target, output, settings)

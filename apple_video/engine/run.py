"""Swap jobs: plan -> analyze -> track/select -> render -> finish, resumable through a job folder."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from apple_video.engine.analysis import face_from_dict
from apple_video.engine.clips import ClipPlan, find_source_faces, plan_folder, plan_video
from apple_video.engine.executors import (
    ANALYZE,
    RENDER,
    Done,
    Ticket,
    make_pool,
    worker_error,
)
from apple_video.engine.factories import EngineFactories
from apple_video.engine.layout import (
    MANIFEST,
    file_identity,
    job_dir_for,
    joined_earlier,
    lock_path_for,
    remove_job_dir,
    remove_leftovers,
)
from apple_video.engine.media_io import FolderSink, write_atomic
from apple_video.engine.stages import write_json
from apple_video.engine.still import StillRenderer, no_faces_message
from apple_video.engine.workers import (
    AnalyzeResult,
    AnalyzeTask,
    ChunkInput,
    RenderResult,
    RenderTask,
    WorkerReport,
)
from apple_video.errors import AppleVideoError, NoFaceError, OutputError
from apple_video.faces.select import select_targets
from apple_video.faces.track import find_cuts
from apple_video.faces.types import FaceTarget, SourceFace
from apple_video.media.images import list_frames, read_image, write_image
from apple_video.media.video import concat_chunks, read_packets
from apple_video.progress import progress
from apple_video.settings import SwapSettings, output_record
from apple_video.swappers.factory import tracking_for

logger = logging.getLogger(__name__)


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
    done_earlier: bool = False  # a batch re-run found this clip's output: nothing to do
    refused: bool = False  # a batch item refused in planning (a bad input): the batch exits 2 if only these failed

    def line(self) -> str:
        if self.status != "ok":
            return f"{self.input}: FAILED: {self.error}"
        if self.done_earlier:
            return f"{self.output}: done earlier (--force redoes it)"
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        return (f"{self.output}: {self.frames} frames, {self.faces_swapped} faces swapped in {self.frames_swapped} frames, "
                f"{self.frames_passed_through} passed through, {self.faces_skipped + self.small_faces_skipped} faces skipped"
                f"{f', {self.chunks_resumed} chunks resumed' if self.chunks_resumed else ''} ({stages})")


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


@contextlib.contextmanager
def job_lock(output: Path):
    """One job per output: a second run on the same output refuses at once instead of redoing the work."""
    path = lock_path_for(output)
    made = not path.parent.exists()  # a frame folder's output: removed again if the job leaves it empty
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held for the whole job
    try:
        try:
            # a POSIX record lock: owned by this process alone, so the forked analysis helper never holds it
            # (a flock would be shared with it and outlive a killed run)
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
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
        if made:
            with contextlib.suppress(OSError):
                path.parent.rmdir()


_DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied", errno.EFBIG: "the file is too large for this file system or limit"}


def _remove_partials(output: Path) -> None:
    """Half-written files (temp names) of this job, a job folder a stopped run was deleting; finished chunks stay
    for the resume."""
    remove_leftovers(output)
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


def _this_jobs(manifest_path: Path, key: str, chunks: list[tuple[int, int]]) -> dict | None:
    """The manifest of an earlier run of this very job (same inputs, settings and chunks), or None."""
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None
    same = isinstance(manifest, dict) and manifest.get("key") == key
    return manifest if same and manifest.get("chunks") == [list(c) for c in chunks] else None


def _open_manifest(job_dir: Path, key: str, chunks: list[tuple[int, int]], force: bool) -> dict:
    manifest_path = job_dir / MANIFEST
    if force and job_dir.exists():
        shutil.rmtree(job_dir)
    if manifest_path.exists():
        manifest = _this_jobs(manifest_path, key, chunks)
        if manifest is not None:
            return manifest
        logger.info("inputs or settings changed since the interrupted run: starting over")
        shutil.rmtree(job_dir)
    for sub in ("analysis", "chunks"):
        (job_dir / sub).mkdir(parents=True, exist_ok=True)
    manifest = {"key": key, "chunks": [list(c) for c in chunks], "analyzed": [], "rendered": [], "stats": {}}
    write_json(manifest_path, manifest)
    return manifest


@dataclass
class BatchResult:
    summaries: list[Summary]
    workers: list[WorkerReport] = field(default_factory=list)  # the render workers' own accounts


class ClipRun:
    """The driver's side of one clip while it runs: manifest, analysis files, tracking, chunk files and the final
    join. Its chunks go out as tickets whose arguments are data (packets, targets, source faces): no worker opens
    a path."""

    def __init__(self, key: int, plan: ClipPlan, faces: object) -> None:
        self.key, self.plan, self.faces = key, plan, faces  # faces: the source faces, as the pool shares them
        self.settings = plan.settings
        self.chunks = plan_chunks(plan.frame_count, plan.keyframes, self.settings.chunk_frames)
        self.summary = Summary(str(plan.input), str(plan.output), frames=plan.frame_count)
        self.manifest_path = plan.job_dir / MANIFEST
        self.targets: dict[int, list[FaceTarget]] = {}
        self.started = time.perf_counter()
        self.stage_started = self.started

    # -- analysis --
    def start(self) -> list[Ticket]:
        if self.plan.kind == "folder":
            self.plan.output.mkdir(parents=True, exist_ok=True)
        _remove_partials(self.plan.output)  # a killed run's half-written files (this run holds the output's lock)
        key = _fingerprint(self.plan.input, list(self.plan.sources), self.settings)
        earlier = _this_jobs(self.manifest_path, key, self.chunks)
        if self.plan.output.is_file() and not self.settings.force and earlier is None:
            # the planner lets an output in place through when its job folder joined it: only that same job may
            # finish it (another command's run would overwrite it without --force)
            raise OutputError(f"output exists: {self.plan.output} (use --force to overwrite)")
        self.manifest = _open_manifest(self.plan.job_dir, key, self.chunks, self.settings.force)
        self.summary.chunks_resumed = len(self.manifest["rendered"])
        todo = [c for c in range(len(self.chunks)) if c not in self.manifest["analyzed"]]
        if not todo:
            return self._tracked()
        return [Ticket(ANALYZE, self.key, c, functools.partial(self._analyze_args, c)) for c in todo]

    def _chunk_input(self, chunk: int) -> ChunkInput:
        start, stop = self.chunks[chunk]
        if self.plan.kind == "video":
            return ChunkInput(packets=read_packets(self.plan.info, start, stop), rotation=self.plan.info.rotation)
        return ChunkInput(images=tuple((i, read_image(self.plan.frame_paths[i]).rgb) for i in range(start, stop)))

    def _analyze_args(self, chunk: int) -> tuple:
        return (AnalyzeTask(self.key, chunk, self.settings, self._chunk_input(chunk)),)

    def analyzed(self, result: AnalyzeResult) -> list[Ticket]:
        write_json(self.plan.analysis_file(result.chunk), {"faces": result.faces, "signatures": result.signatures})
        self.manifest["analyzed"].append(result.chunk)
        write_json(self.manifest_path, self.manifest)
        if len(self.manifest["analyzed"]) < len(self.chunks):
            return []
        return self._tracked()

    # -- tracking (driver, cheap) --
    def _tracked(self) -> list[Ticket]:
        now = time.perf_counter()
        self.summary.seconds["analyze"] = now - self.stage_started
        frame_count, settings = self.plan.frame_count, self.settings
        detections: list[list] = [[] for _ in range(frame_count)]
        signatures: list = [None] * frame_count
        for c in range(len(self.chunks)):
            analysis = json.loads(self.plan.analysis_file(c).read_text())
            for index, faces in analysis["faces"].items():
                detections[int(index)] = [face_from_dict(f) for f in faces]
            for index, signature in analysis["signatures"].items():
                signatures[int(index)] = np.asarray(signature, np.float32)
        cuts = find_cuts(signatures, settings.tracking.cut_threshold) | self.plan.cuts
        selection = select_targets(detections, self.plan.fps, settings.selector, tracking_for(settings), cuts)
        self.summary.small_faces_skipped = selection.skipped_small
        if not any(selection.targets.values()) and not settings.allow_no_faces:
            shutil.rmtree(self.plan.job_dir, ignore_errors=True)  # exit 2 leaves nothing behind; a rerun fails alike
            raise NoFaceError(no_faces_message(self.plan.input, frame_count, detections, selection.skipped_small,
                                                settings))
        self.targets = selection.targets
        self.stage_started = time.perf_counter()
        self.summary.seconds["track"] = self.stage_started - now
        todo = [c for c in range(len(self.chunks)) if c not in self.manifest["rendered"]]
        return [Ticket(RENDER, self.key, c, functools.partial(self._render_args, c)) for c in todo]

    # -- rendering --
    def _render_args(self, chunk: int) -> tuple:
        start, stop = self.chunks[chunk]
        targets = {i: self.targets[i] for i in range(start, stop) if self.targets.get(i)}
        video = self.plan.kind == "video"
        task = RenderTask(self.key, chunk, self.settings, self._chunk_input(chunk), targets,
                          self.plan.info if video else None, self.plan.output.suffix)
        return task, self.faces

    def rendered(self, result: RenderResult) -> None:
        if self.plan.kind == "video":
            write_atomic(self.plan.chunk_file(result.chunk), result.encoded)
        else:
            start, stop = self.chunks[result.chunk]
            swapped = dict(result.swapped)
            sink = FolderSink(self.plan.frame_paths, self.plan.output)
            for index in range(start, stop):
                sink.write(index, swapped.get(index), index in swapped)
        self.manifest["rendered"].append(result.chunk)
        self.manifest["stats"][str(result.chunk)] = {k: int(v) for k, v in asdict(result.stats).items()}
        write_json(self.manifest_path, self.manifest)

    @property
    def complete(self) -> bool:
        return hasattr(self, "manifest") and len(self.manifest["rendered"]) == len(self.chunks)

    # -- finish --
    def finish(self) -> Summary:
        spec, settings, summary = self.plan, self.settings, self.summary
        started = time.perf_counter()
        summary.seconds["render"] = started - self.stage_started
        if spec.kind == "video":
            info = spec.info
            pts = [p - info.pts[0] for p in info.pts] if settings.trimmed else list(info.pts)
            window = None
            if settings.trimmed:
                start_s = float(info.pts[0] * info.time_base)
                window = (start_s, start_s + info.duration)
            if not joined_earlier(spec.output):  # else a run stopped after the rename: only the folder is left
                joined = spec.job_dir / f"joined{spec.output.suffix}"
                concat_chunks([spec.chunk_file(c) for c in range(len(self.chunks))], joined,
                              info.path if info.audio else None, pts, info.time_base, info.rotation, window,
                              rate=info.fps, last_duration=info.frame_duration, source=info.path)
                self.manifest["joined"] = file_identity(joined)  # recorded before the rename, known after it
                write_json(self.manifest_path, self.manifest)
                os.replace(joined, spec.output)
        stats = self.manifest["stats"].values()
        summary.frames_swapped = sum(s["swapped_frames"] for s in stats)
        summary.faces_swapped = sum(s["faces_swapped"] for s in stats)
        summary.faces_skipped = sum(s["faces_skipped"] for s in stats)
        summary.frames_passed_through = self.plan.frame_count - summary.frames_swapped
        if summary.faces_swapped == 0:
            logger.warning("no face was swapped in %s: the output is the input re-encoded%s", spec.input,
                           "" if settings.allow_no_faces else " (the swapper skipped every face it was given)")
        remove_job_dir(spec.output)
        summary.seconds["finish"] = time.perf_counter() - started
        return summary


WINDOW = 3  # clips in flight at once: the next ones are analysed while the current one renders


class _Run:
    """The scheduler of one run: clips enter a window, their chunks go to the pool, results come back in any order;
    the driver writes each one, advances its clip and starts the next clip as one ends."""

    def __init__(self, plans: list[ClipPlan], settings: SwapSettings, factories: EngineFactories,
                 raise_errors: bool, lock: bool) -> None:
        self.plans = list(plans)
        self.lock = lock
        self.settings = settings
        self.factories = factories
        self.raise_errors = raise_errors
        self.summaries: dict[int, Summary] = {}
        self.active: dict[int, tuple[ClipRun, contextlib.ExitStack]] = {}
        self.shared: dict[tuple[Path, ...], object] = {}
        self.next = 0

    def run(self) -> BatchResult:
        chunks = sum(len(plan_chunks(p.frame_count, p.keyframes, p.settings.chunk_frames)) for p in self.plans)
        self.pool = make_pool(self.settings, self.factories, chunks)
        try:
            with progress(None, "analyze") as analyzed, progress(None, "swap") as swapped:
                self.bars = {ANALYZE: analyzed, RENDER: swapped}
                while True:
                    self._fill()
                    if not self.active:
                        break
                    done = self.pool.next_done()
                    if done is None:
                        raise RuntimeError("clips are open but no chunk is queued")  # a scheduler bug, not the input's
                    self._handle(done)
            workers = self.pool.reports()
        finally:
            self.pool.close()
            for _, stack in self.active.values():
                stack.close()
        return BatchResult([self.summaries[i] for i in range(len(self.plans))], workers)

    def _faces_for(self, plan: ClipPlan) -> object:
        """The clip's source faces (found in planning), put in the pool once per set of source photos."""
        if plan.sources not in self.shared:
            self.shared[plan.sources] = self.pool.share(list(plan.faces))
        return self.shared[plan.sources]

    def _fill(self) -> None:
        while len(self.active) < WINDOW and self.next < len(self.plans):
            key, plan = self.next, self.plans[self.next]
            self.next += 1
            stack = contextlib.ExitStack()
            try:
                stack.enter_context(output_errors(plan.output))
                if self.lock:
                    stack.enter_context(job_lock(plan.output))
                clip = ClipRun(key, plan, self._faces_for(plan))
                self.active[key] = (clip, stack)
                tickets = clip.start()
                self._count(clip)
                self._advance(clip, tickets)
            except Exception as error:  # noqa: BLE001 - _fail re-raises what is not the clip's own failure
                self.active.pop(key, None)
                self._fail(key, plan.input, plan.output, stack, error)

    def _count(self, clip: ClipRun) -> None:
        """Grow the progress bars' totals by the frames this clip still has to go through."""
        for stage, done in ((ANALYZE, clip.manifest["analyzed"]), (RENDER, clip.manifest["rendered"])):
            frames = sum(stop - start for c, (start, stop) in enumerate(clip.chunks) if c not in done)
            bar = self.bars[stage]
            bar.total = (bar.total or 0) + frames
            if hasattr(bar, "refresh"):
                bar.refresh()

    def _advance(self, clip: ClipRun, tickets: list[Ticket]) -> None:
        if tickets:
            self.pool.submit(tickets)
        elif clip.complete:
            _, stack = self.active.pop(clip.key)
            with stack:
                self.summaries[clip.key] = clip.finish()

    def _handle(self, done: Done) -> None:
        entry = self.active.get(done.ticket.clip)
        if entry is None:
            return  # a result of a clip that failed meanwhile
        clip, stack = entry
        try:
            if done.error is not None:
                raise done.error
            with output_errors(clip.plan.output):
                start, stop = clip.chunks[done.ticket.chunk]
                self.bars[done.ticket.stage].update(stop - start)
                if done.ticket.stage == ANALYZE:
                    self._advance(clip, clip.analyzed(done.result))
                else:
                    clip.rendered(done.result)
                    self._advance(clip, [])
        except Exception as error:  # noqa: BLE001 - see _fail
            self.active.pop(clip.key, None)
            self.pool.drop(clip.key)
            self._fail(clip.key, clip.plan.input, clip.plan.output, stack, error)

    def _fail(self, key: int, clip: Path, output: Path, stack: contextlib.ExitStack, error: BaseException) -> None:
        """A clip's failure: one line in its summary; the other clips go on. A single job raises it instead."""
        try:
            stack.__exit__(type(error), error, error.__traceback__)  # output_errors turns disk errors into ours
        except BaseException as mapped:  # noqa: BLE001 - the mapped error replaces the original
            error = mapped
        if self.raise_errors or not isinstance(error, Exception):
            raise error
        if not isinstance(error, AppleVideoError):
            error = worker_error(error)
        logger.error("%s: %s", clip, error)
        self.summaries[key] = Summary(str(clip), str(output), status="failed", error=str(error))


def run_clips(plans: list[ClipPlan], settings: SwapSettings, raise_errors: bool = False,
              factories: EngineFactories | None = None, lock: bool = False) -> BatchResult:
    """Run the planned clips on one pool of workers (built once for all of them): the batch and single-job driver.
    The workers build their models with `factories` (default: the ones `settings` name). `lock`: each clip's
    output is locked here (a batch; a single job's caller holds its lock)."""
    return _Run(plans, settings, factories or EngineFactories.for_settings(settings), raise_errors, lock).run()


def swap_video(source_paths: list[Path], input_path: Path, output: Path, settings: SwapSettings,
               factories: EngineFactories | None = None) -> Summary:
    """Plan one clip (probe it, find the source faces) and run it."""
    factories = factories or EngineFactories.for_settings(settings)
    faces = find_source_faces(source_paths, settings, factories.detector)
    plan = plan_video(tuple(source_paths), faces, input_path, output, settings)
    return run_clips([plan], settings, raise_errors=True, factories=factories).summaries[0]


def swap_folder(source_paths: list[Path], input_path: Path, output: Path, settings: SwapSettings, fps: float = 25.0,
                factories: EngineFactories | None = None) -> Summary:
    factories = factories or EngineFactories.for_settings(settings)
    faces = find_source_faces(source_paths, settings, factories.detector)
    plan = plan_folder(tuple(source_paths), faces, input_path, output, settings, fps)
    return run_clips([plan], settings, raise_errors=True, factories=factories).summaries[0]


def swap_image(source_paths: list[Path], input_path: Path, output: Path, settings: SwapSettings,
               factories: EngineFactories | None = None, faces: tuple[SourceFace, ...] | None = None) -> Summary:
    """One still image: detect, select, swap, paste (the shared still renderer), write with the synthetic tag.
    `faces`: the source faces when planning found them."""
    started = time.perf_counter()
    data = read_image(input_path)
    factories = factories or EngineFactories.for_settings(settings)
    if faces is None:
        faces = find_source_faces(source_paths, settings, factories.detector)
    renderer = StillRenderer(settings, factories)
    renderer.use_sources(source_paths, faces)
    result = renderer.render(data.rgb, input_path, settings.allow_no_faces)
    write_image(output, data, result.rgb)
    return Summary(str(input_path), str(output), frames=1, frames_swapped=int(result.swapped),
                   frames_passed_through=int(not result.swapped), faces_swapped=result.faces_swapped,
                   faces_skipped=result.faces_skipped, small_faces_skipped=result.small_faces_skipped,
                   seconds={"total": time.perf_counter() - started})

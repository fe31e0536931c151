"""Where the stage workers run: in-process (local) or on long-lived Ray actors (ray), fed chunk by chunk.

Plain Ray actors, not Ray Data: a Ray Data actor pool lives for one dataset (one clip's stage), so every clip
would build the model again; actors held for the whole run build it once and let the next clips' analysis overlap
the current clip's rendering. The driver sends each task's data (packets, targets, sources) with the call and gets
results back through the object store; workers never open a path."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import signal
import socket
import sys
import tempfile
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from apple_video.engine.factories import EngineFactories
from apple_video.engine.workers import AnalyzeWorker, RenderWorker, WorkerReport
from apple_video.errors import AppleVideoError, DeviceError, UserError, WorkerError
from apple_video.settings import SwapSettings
from apple_video.swappers.factory import resolve_swapper_name
from apple_video.swappers.presets import apple_preset

logger = logging.getLogger(__name__)


def ray_failure(address: str, error: BaseException) -> str:
    """One line naming the likely cause of a failed cluster connection."""
    text = str(error)
    lowered = text.lower()
    if "version mismatch" in lowered or "was started with" in lowered:
        cause = ("Ray or Python versions differ between this machine and the cluster; install the cluster's "
                 "versions here")
    elif "token" in lowered or "auth" in lowered or "unauthenticated" in lowered:
        cause = ("the cluster uses token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the output "
                 "of `ray get-auth-token` on the head node (or copy its ~/.ray/auth_token here)")
    elif "failed to connect" in lowered or "timed out" in lowered or "unavailable" in lowered:
        cause = ("the head answered but could not be joined: check the port and firewalls; if the cluster uses token "
                 "authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (`ray get-auth-token` on the head)")
    else:
        cause = text.splitlines()[0] if text else error.__class__.__name__
    # Ray's own hints name its `ray start --address`; apple-video's flag is --ray-address
    cause = re.sub(r"(?<![\w-])--address\b", "--ray-address", cause)
    return f"cannot connect to the Ray cluster at '{address}': {cause}"


@contextlib.contextmanager
def _native_stderr_captured():
    """Ray's C++ client writes its retries (pages of gcs_client lines) straight to fd 2: keep them in a file
    while connecting; the caller reads it to name the cause."""
    with tempfile.TemporaryFile(mode="w+b") as capture:
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        lines: list[str] = []
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines.extend(capture.read().decode(errors="replace").splitlines())


def connect_ray(address: str | None) -> None:
    """Join (or start) Ray once per run, before any clip: a bad cluster fails here with one line."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")  # Ray's C++ lines (core_worker.cc ...) stay off the terminal
    if address in (None, "", "local"):
        with _native_stderr_captured() as native:  # e.g. "logging.cc: Set ray log level ...": not for the terminal
            ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
                     configure_logging=False, logging_level=logging.ERROR)
        for line in native:
            logger.debug("ray: %s", line)
        return
    check_reachable(address)
    failure: Exception | None = None
    with _native_stderr_captured() as native:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False, logging_level=logging.ERROR)
        except Exception as error:  # noqa: BLE001 - Ray raises many types here; all mean "not connected"
            failure = error
    for line in native:
        logger.debug("ray: %s", line)
    if failure is not None:
        hints = [line for line in native if "auth" in line.lower() or "version" in line.lower()]
        raise UserError(ray_failure(address, RuntimeError("\n".join([str(failure), *hints[-1:]])))) from None


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when a host:port cluster address does not answer (ray.init waits long)."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address must be 'auto', 'host:port' or 'ray://host:port', not '{address}'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError:
        raise UserError(f"cannot reach the Ray cluster at '{address}' (nothing answers there within {timeout:.0f}s)") from None


ANALYZE, RENDER = "analyze", "render"
DEPTH = 2  # tasks queued per actor: the next chunk waits at the actor while this one runs (no gap between clips)


@dataclass(frozen=True)
class Ticket:
    """One chunk's stage work; `make` builds the call's arguments (reads the packets) when it is dispatched."""

    stage: str
    clip: int  # the clip's key in its run
    chunk: int
    make: Callable[[], tuple]


@dataclass
class Done:
    ticket: Ticket
    result: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class ActorPlan:
    """How many actors of each stage, and what each asks Ray for."""

    render: int
    analysis: int
    render_gpus: float
    cpus_each: float


def needs_gpu(settings: SwapSettings) -> bool:
    """Real APPLE weights (12B FLUX) on a CPU take hours per clip: on a cluster they only run on GPUs."""
    return resolve_swapper_name(settings) == "apple" and apple_preset(settings.model).model.kind != "tiny"


def plan_actors(settings: SwapSettings, resources: dict[str, float], cluster: bool) -> ActorPlan:
    """Actors from the cluster's resources: a render actor per GPU (per `--num-gpus` share), analysis actors on
    the CPUs left; `--workers` sets the render actors. All of them fit at once, so none waits for another."""
    gpus, cpus = float(resources.get("GPU", 0)), max(1.0, float(resources.get("CPU", 1)))
    per_gpu = settings.num_gpus if settings.num_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    if per_gpu > 0 and gpus < per_gpu:
        raise DeviceError(f"--num-gpus {per_gpu:g} asks for GPUs but the Ray cluster has {gpus:g}; "
                          f"drop --num-gpus or add GPU nodes")
    if cluster and needs_gpu(settings) and per_gpu == 0:
        raise DeviceError(f"the {apple_preset(settings.model).name} model needs a GPU but the Ray cluster has none "
                          f"({cpus:g} CPUs); add GPU nodes, or use --preset tiny or --swapper classic")
    if settings.workers:
        render = settings.workers
    elif per_gpu > 0:
        render = max(1, int(gpus // per_gpu))
    else:
        render = max(1, int(cpus) // 2)
    analysis = max(1, int(cpus) - (0 if per_gpu > 0 else render))
    if settings.workers:
        analysis = min(analysis, max(1, settings.workers))
    cpus_each = min(1.0, cpus / (analysis + (0 if per_gpu > 0 else render)))
    return ActorPlan(render, analysis, per_gpu, cpus_each)


def worker_error(error: BaseException) -> AppleVideoError:
    """A worker's failure as one line: ours as themselves, others naming the node (the trace for --debug)."""
    ours = _our_error(error)
    if ours is not None:
        return ours
    cause = getattr(error, "cause", None) or error
    remote = cause is not error  # Ray's text names the node and holds the worker's trace
    found = re.search(r"\bip=([^,)\s]+)", str(error)) if remote else None
    node = found.group(1) if found else "this machine"
    text = str(cause).strip().splitlines()
    failure = WorkerError(f"internal error on node {node}: {cause.__class__.__name__}"
                          f"{': ' + text[0] if text else ''} (run with --debug for the trace)")
    failure.add_note(str(error) if remote else "".join(traceback.format_exception(cause)))
    return failure


def _our_error(error: BaseException | None) -> AppleVideoError | None:
    """Ray raises a worker's error as a RayTaskError that also derives from its class: the one to show is `cause`."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        cause = getattr(error, "cause", None)
        if isinstance(cause, AppleVideoError):
            return cause
        if isinstance(error, AppleVideoError) and cause is None:
            return error
        error = cause or error.__cause__
    return None


def _serve_analysis(factories: EngineFactories, connection: Connection) -> None:
    """The analysis helper process: analyse each chunk task received until told to stop (None) or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops this process
    for signum in (signal.SIGTERM, signal.SIGHUP):  # not the parent's handlers (they stop the parent's job)
        signal.signal(signum, signal.SIG_DFL)
    worker = AnalyzeWorker(factories)
    with contextlib.suppress(EOFError, OSError, KeyboardInterrupt):  # the parent died or closed the pipe: done
        while (args := connection.recv()) is not None:
            try:
                reply = ("done", worker.analyze(*args))
            except Exception as error:  # noqa: BLE001 - sent back: the parent fails that clip as in-process
                reply = ("error", error)
            connection.send(reply)


class AnalysisHelper:
    """A forked process analysing one chunk at a time beside the parent's own work. dlib holds the GIL, so a
    thread would not run beside the parent; a fork shares the models already loaded (no load, ~10 ms start).
    Chunk results depend only on the chunk, so who analysed it never changes an output."""

    def __init__(self, factories: EngineFactories) -> None:
        context = multiprocessing.get_context("fork")
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve_analysis, args=(factories, child), daemon=True,
                                        name="apple-video-analysis")
        self._process.start()
        child.close()
        self.ticket: Ticket | None = None

    @property
    def busy(self) -> bool:
        return self.ticket is not None

    def send(self, ticket: Ticket, args: tuple) -> bool:
        try:
            self._connection.send(args)
        except (OSError, ValueError):
            return False
        self.ticket = ticket
        return True

    def ready(self) -> bool:
        return self.busy and self._connection.poll()

    def receive(self) -> Done | None:
        """The chunk's result (waits for it); None when the process died (its ticket must run elsewhere)."""
        ticket, self.ticket = self.ticket, None
        try:
            kind, value = self._connection.recv()
        except (EOFError, OSError):
            return None
        return Done(ticket, value) if kind == "done" else Done(ticket, error=value)

    def close(self) -> None:
        """Stop the process: at once when it is busy (its result is no longer wanted: an error or Ctrl-C)."""
        if not self.busy:
            with contextlib.suppress(OSError, ValueError):
                self._connection.send(None)
            self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._connection.close()


def helper_allowed() -> bool:
    """A second process only where a second core and fork exist (Linux/macOS CPython), and not from a process
    that joined Ray (its threads and sockets are not the fork's to share)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ray = sys.modules.get("ray")
    joined = ray is not None and hasattr(ray, "is_initialized") and ray.is_initialized()
    return cores >= 2 and "fork" in multiprocessing.get_all_start_methods() and not joined


class LocalPool:
    """One worker of each stage in this process, tasks run one at a time when a result is asked for; with
    `helper`, a forked process analyses a second chunk meanwhile. It is forked here, before the run takes any job
    lock or starts a thread: it inherits neither (a lock it held would outlive a killed run)."""

    def __init__(self, factories: EngineFactories, helper: bool = False) -> None:
        self.factories = factories
        self.analyzer = AnalyzeWorker(factories)
        self.renderer: RenderWorker | None = None  # built at the first chunk to render
        self.queues: dict[str, deque[Ticket]] = {RENDER: deque(), ANALYZE: deque()}
        self.helper: AnalysisHelper | None = AnalysisHelper(factories) if helper else None

    def share(self, value: object) -> object:
        return value

    def submit(self, tickets: list[Ticket]) -> None:
        for ticket in tickets:
            self.queues[ticket.stage].append(ticket)

    def drop(self, clip: int) -> None:
        for stage, queue in self.queues.items():
            self.queues[stage] = deque(t for t in queue if t.clip != clip)

    def _feed_helper(self) -> None:
        """Hand the helper an analysis chunk when this process has other work to do meanwhile."""
        analyses = self.queues[ANALYZE]
        if not analyses or (len(analyses) < 2 and not self.queues[RENDER]):
            return
        if self.helper is None or self.helper.busy:
            return
        ticket = analyses.popleft()
        try:
            args = ticket.make()
        except Exception:  # noqa: BLE001 - this process runs it again and reports the error as its own
            analyses.appendleft(ticket)
            return
        if not self.helper.send(ticket, args):
            analyses.appendleft(ticket)
            self._drop_helper()

    def _drop_helper(self) -> None:
        self.helper.close()
        self.helper = None

    def _helper_done(self) -> Done | None:
        ticket = self.helper.ticket
        done = self.helper.receive()
        if done is None:  # the helper died (killed, out of memory): this process takes its chunk
            logger.debug("the analysis helper process ended; analysing in this process")
            self.queues[ANALYZE].appendleft(ticket)
            self._drop_helper()
            return self.next_done()
        return done

    def next_done(self) -> Done | None:
        if self.helper is not None and self.helper.ready():
            return self._helper_done()
        self._feed_helper()
        queue = self.queues[RENDER] or self.queues[ANALYZE]
        if not queue:
            return self._helper_done() if self.helper is not None and self.helper.busy else None
        ticket = queue.popleft()
        try:
            args = ticket.make()
            if ticket.stage == ANALYZE:
                return Done(ticket, self.analyzer.analyze(*args))
            if self.renderer is None:
                self.renderer = RenderWorker(self.factories)
            return Done(ticket, self.renderer.render(*args))
        except AppleVideoError as error:
            return Done(ticket, error=error)
        except Exception as error:  # noqa: BLE001 - one clip's bug fails that clip; the caller decides
            return Done(ticket, error=error)

    def reports(self) -> list[WorkerReport]:
        return [self.renderer.report()] if self.renderer is not None else []

    def close(self) -> None:
        if self.helper is not None:
            self.helper.close()
            self.helper = None


@dataclass
class _Actor:
    handle: Any
    stage: str
    load: int = 0
    alive: bool = True


@dataclass
class RayPool:
    """Long-lived actors for the whole run. A lost actor (its node died) costs only its chunks: they go to the
    other actors of the stage, or to a new actor when none is left."""

    factories: EngineFactories
    plan: ActorPlan
    actors: list[_Actor] = field(default_factory=list)
    queues: dict[str, deque[Ticket]] = field(default_factory=lambda: {RENDER: deque(), ANALYZE: deque()})
    inflight: dict[Any, tuple[Ticket, _Actor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for _ in range(self.plan.render):
            self._spawn(RENDER)
        for _ in range(self.plan.analysis):
            self._spawn(ANALYZE)
        logger.info("ray: %d render actors (%s each), %d analysis actors", self.plan.render,
                    f"{self.plan.render_gpus:g} GPU" if self.plan.render_gpus else f"{self.plan.cpus_each:g} CPU",
                    self.plan.analysis)

    def _spawn(self, stage: str, replacement: bool = False) -> _Actor:
        """A replacement asks for no CPU: the lost node took its share, and the other stage's actors hold the rest."""
        import ray

        cpus = 0 if replacement else self.plan.cpus_each
        if stage == RENDER:
            resources = ({"num_gpus": self.plan.render_gpus, "num_cpus": 0} if self.plan.render_gpus
                         else {"num_cpus": cpus})
            handle = ray.remote(RenderWorker).options(max_restarts=0, **resources).remote(self.factories)
        else:
            handle = ray.remote(AnalyzeWorker).options(max_restarts=0, num_cpus=cpus).remote(self.factories)
        actor = _Actor(handle, stage)
        self.actors.append(actor)
        return actor

    def share(self, value: object) -> object:
        import ray

        return ray.put(value)

    def submit(self, tickets: list[Ticket]) -> None:
        for ticket in tickets:
            self.queues[ticket.stage].append(ticket)
        self._dispatch()

    def drop(self, clip: int) -> None:
        for stage, queue in self.queues.items():
            self.queues[stage] = deque(t for t in queue if t.clip != clip)

    def _dispatch(self) -> None:
        for stage, queue in self.queues.items():
            while queue:
                live = [a for a in self.actors if a.stage == stage and a.alive and a.load < DEPTH]
                if not live:
                    break
                actor = min(live, key=lambda a: a.load)
                ticket = queue.popleft()
                try:
                    args = ticket.make()
                except Exception as error:  # noqa: BLE001 - reading the chunk failed on the driver: that clip's error
                    self.inflight[_Failed(error)] = (ticket, actor)
                    actor.load += 1
                    continue
                method = actor.handle.render if stage == RENDER else actor.handle.analyze
                self.inflight[method.remote(*args)] = (ticket, actor)
                actor.load += 1

    def next_done(self) -> Done | None:
        import ray
        from ray.exceptions import ObjectLostError, RayActorError

        while True:
            failed = next((ref for ref in self.inflight if isinstance(ref, _Failed)), None)
            if failed is not None:
                ticket, actor = self.inflight.pop(failed)
                actor.load -= 1
                self._dispatch()
                return Done(ticket, error=failed.error)
            if not self.inflight:
                return None
            [ref], _ = ray.wait(list(self.inflight), num_returns=1)
            ticket, actor = self.inflight.pop(ref)
            actor.load -= 1
            try:
                result = ray.get(ref)
            except (RayActorError, ObjectLostError) as lost:
                self._lost(actor, ticket, lost)
                continue
            except Exception as error:  # noqa: BLE001 - a RayTaskError: the worker raised
                self._dispatch()
                return Done(ticket, error=worker_error(error))
            self._dispatch()
            return Done(ticket, result)

    def _lost(self, actor: _Actor, ticket: Ticket, error: BaseException) -> None:
        if actor.alive:
            actor.alive = False
            logger.warning("a %s worker was lost (%s): its chunks run again elsewhere", actor.stage,
                           str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__)
        self.queues[ticket.stage].appendleft(ticket)
        if not any(a.alive for a in self.actors if a.stage == actor.stage):
            self._spawn(actor.stage, replacement=True)
        self._dispatch()

    def reports(self) -> list[WorkerReport]:
        import ray

        reports = []
        for actor in self.actors:
            if actor.stage == RENDER and actor.alive:
                try:
                    reports.append(ray.get(actor.handle.report.remote(), timeout=60))
                except Exception as error:  # noqa: BLE001 - a report is nice to have; the outputs are written
                    logger.debug("no report from a render actor: %s", error)
        return reports

    def close(self) -> None:
        import ray

        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor.handle)


@dataclass(eq=False)
class _Failed:
    """An in-flight slot for a task whose arguments could not be made on the driver."""

    error: BaseException


def make_pool(settings: SwapSettings, factories: EngineFactories, chunks: int) -> LocalPool | RayPool:
    """The run's workers; `chunks`: how many chunks it has (a local run of one chunk forks no analysis helper)."""
    if settings.executor == "local":
        return LocalPool(factories, helper=chunks > 1 and helper_allowed())
    import ray

    connect_ray(settings.ray_address)
    cluster = settings.ray_address not in (None, "", "local")
    return RayPool(factories, plan_actors(settings, ray.cluster_resources(), cluster))

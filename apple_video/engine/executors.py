"""Run a stage worker over chunk items: in-process (local) or on a Ray Data actor pool (ray)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
from collections.abc import Iterator

import numpy as np

from apple_video.errors import AppleVideoError, UserError
from apple_video.settings import SwapSettings

logger = logging.getLogger(__name__)


def _as_batch(item: dict) -> dict[str, np.ndarray]:
    return {key: np.asarray([value]) for key, value in item.items()}


def _rows(batch: dict[str, np.ndarray]) -> Iterator[dict]:
    keys = list(batch)
    for i in range(len(batch[keys[0]])):
        yield {key: batch[key][i].item() if hasattr(batch[key][i], "item") else batch[key][i] for key in keys}


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
    if address in (None, "", "local"):
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
                 configure_logging=False, logging_level=logging.ERROR)
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


def ensure_ray(settings: SwapSettings) -> None:
    import ray

    connect_ray(settings.ray_address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in ("ray", "ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(max(logging.getLogger().level, logging.WARNING))


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


def actor_pool(size: int):
    """Ray's actor-pool setting moved between releases; keep it in one place."""
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(size=size)


def run_stage(worker_cls: type, args: tuple, items: list[dict], settings: SwapSettings, gpu: bool) -> Iterator[dict]:
    """Yield one result row per item, as items finish (order not guaranteed on Ray)."""
    if not items:
        return
    if settings.executor == "local":
        worker = worker_cls(*args)
        for item in items:
            yield from _rows(worker(_as_batch(item)))
        return
    import ray.data

    ensure_ray(settings)
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    resources = {"num_gpus": settings.num_gpus} if gpu and settings.num_gpus > 0 else {"num_cpus": 1}
    mapped = dataset.map_batches(
        worker_cls,
        fn_constructor_args=args,
        batch_size=1,
        batch_format="numpy",
        compute=actor_pool(max(1, min(settings.workers, len(items)))),
        **resources,
    )
    try:
        for row in mapped.iter_rows():
            yield {key: value.item() if hasattr(value, "item") else value for key, value in row.items()}
    except Exception as error:  # Ray wraps worker errors: show ours as themselves (one line, right exit code)
        cause = _our_error(error)
        if cause is not None:
            raise cause from None
        raise


def _our_error(error: BaseException) -> AppleVideoError | None:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, AppleVideoError):
            return error
        error = getattr(error, "cause", None) or error.__cause__
    return None

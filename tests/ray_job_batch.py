"""Run batches as Ray jobs (`ray job submit` to a head with the dashboard) on this machine; used by
tests/test_ray_jobs.py inside its own network namespace (`unshare -n`, loopback only), never on its own.

One head node with the dashboard and the job server. Three jobs go through Ray's job CLI, as an operator submits
them: an undisturbed batch, a batch stopped with `ray job stop` once one clip is finished and then submitted again,
and a batch with a broken clip. The entrypoint is the venv's `apple-video` (absolute path) on the head's files.
Prints one JSON line of what happened. Stops only the processes it started (their process groups)."""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from cluster_batch import BIN, ROOT, ports, start, stop, wait_started

PORT = 6391
DASHBOARD = 8266
ADDRESS = f"http://127.0.0.1:{DASHBOARD}"


def ray(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def wait_job_server(env: dict, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray(["job", "list", "--address", ADDRESS], env).returncode == 0:
            return
        time.sleep(1)
    raise SystemExit("the head's job server did not answer")


def entrypoint(args: list[str], output: Path) -> list[str]:
    return [str(BIN / "apple-video"), "swap", *args, "-o", str(output), "--ray-address", "auto"]


def status(job: str) -> str:
    """The job's status from the SDK: the CLI's `ray job status` prints for people, not for scripts."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ADDRESS).get_job_status(job).value


def wait_status(job: str, timeout: float = 900) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = status(job)
        if now in ("SUCCEEDED", "FAILED", "STOPPED"):
            return now
        time.sleep(1)
    return "TIMEOUT"


def logs(job: str, env: dict) -> str:
    return ray(["job", "logs", job, "--address", ADDRESS], env).stdout


def submit(job: str, args: list[str], output: Path, env: dict) -> dict:
    """`ray job submit` waiting for the end, as an operator runs it: its exit status, the job's status and log."""
    done = ray(["job", "submit", "--address", ADDRESS, "--submission-id", job, "--", *entrypoint(args, output)],
               env, timeout=900)
    return {"submit_rc": done.returncode, "status": wait_status(job), "logs": logs(job, env),
            "submit_tail": (done.stdout + done.stderr)[-3000:]}


def submit_and_stop(job: str, args: list[str], output: Path, env: dict) -> dict:
    """Submit without waiting; `ray job stop` once one clip is finished and another is still being written."""
    sent = ray(["job", "submit", "--no-wait", "--address", ADDRESS, "--submission-id", job, "--",
                *entrypoint(args, output)], env)
    if sent.returncode != 0:
        return {"status": "NOT SUBMITTED", "logs": sent.stdout + sent.stderr}
    deadline, finished = time.time() + 900, []
    while time.time() < deadline and status(job) in ("PENDING", "RUNNING"):
        finished = sorted(p.name for p in output.glob("*.mp4"))
        if finished:
            break
        time.sleep(0.2)
    stopped = ray(["job", "stop", job, "--address", ADDRESS], env, timeout=300)
    return {"finished_at_stop": finished, "stop_rc": stopped.returncode, "stop_out": stopped.stdout + stopped.stderr,
            "status": wait_status(job), "logs": logs(job, env),
            "after_stop": sorted(p.name for p in output.iterdir()) if output.is_dir() else []}


def adopt_orphans() -> None:
    """Become the subreaper of what we start: the job's entrypoint runs in a session of its own, so stopping the
    head's process group alone could leave it (and its Ray workers) running after a failure."""
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def stop_descendants() -> list[str]:
    """Kill what is left of ours; returns what was left (the head's group stopped first: nothing, normally)."""
    left = psutil.Process().children(recursive=True)
    names = []
    for process in left:
        try:
            names.append(" ".join(process.cmdline())[:200])
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)
    return names


def main(data: Path, args: list[str]) -> None:
    adopt_orphans()
    temp = Path(tempfile.mkdtemp(prefix="avjob-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    # the job's entrypoint inherits the head's environment: this checkout first, one torch thread as the local run
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                       "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    env = dict(os.environ)
    head = start([str(BIN / "ray"), "start", "--head", "--port", str(PORT), "--num-cpus", "2",
                  "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(DASHBOARD),
                  *ports(0), "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp), "--block",
                  "--disable-usage-stats"], env, temp / "head.log")
    try:
        wait_started(temp / "head.log")
        wait_job_server(env)
        runs = {"undisturbed": submit("undisturbed", args, data / "out_job", env)}
        runs["stopped"] = submit_and_stop("stopped", args, data / "out_stopped", env)
        runs["resubmitted"] = submit("resubmitted", args, data / "out_stopped", env)
        broken = [args[0], str(data / "clips_broken"), *args[2:]]
        runs["broken"] = submit("broken", broken, data / "out_broken", env)
    finally:
        stop(head)
        left = stop_descendants()
        subprocess.run(["rm", "-rf", str(temp)], check=False)
    print(json.dumps({**runs, "left_running": left}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])

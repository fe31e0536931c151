"""Run a batch on a real three-node Ray cluster (head + two `ray start` workers) on this machine; used by
tests/test_cluster.py inside its own network namespace (`unshare -n`, loopback only), never on its own.

The second worker node runs in its own mount namespace with an empty tmpfs over the folder that holds the clips
and the outputs: it can only work from what the driver sends. The script runs the batch twice through the CLI,
the second time killing the first worker node once a chunk is rendered, and prints one JSON line of what happened.
It stops only the processes it started (their process groups)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PORT = 6390


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    """The process group of one node (raylet, its workers, the `ray start --block` watching them)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
    # the group may outlive its leader for a moment
    time.sleep(0.5)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def ports(k: int) -> list[str]:
    """Each node its own ports: nodes of one machine would otherwise all take Ray's fixed defaults (agent 52365...)."""
    base = 6400 + 20 * k
    names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-grpc-port",
             "--dashboard-agent-listen-port", "--runtime-env-agent-port", "--metrics-export-port")
    return [*(part for i, name in enumerate(names) for part in (name, str(base + i))),
            "--min-worker-port", str(11000 + 1000 * k), "--max-worker-port", str(11999 + 1000 * k)]


def wait_started(log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and "Ray runtime started" in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise SystemExit(f"a Ray node did not start: {log.read_text(errors='replace')[-2000:] if log.exists() else ''}")


def wait_nodes(env: dict, count: int, timeout: float = 90) -> None:
    code = ("import ray,time,sys\n"
            f"ray.init(address='127.0.0.1:{PORT}', log_to_driver=False, logging_level='ERROR')\n"
            f"deadline = time.time() + {timeout}\n"
            f"while sum(n['Alive'] for n in ray.nodes()) < {count} and time.time() < deadline: time.sleep(0.5)\n"
            f"sys.exit(0 if sum(n['Alive'] for n in ray.nodes()) >= {count} else 1)\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout + 60)
    if result.returncode != 0:
        raise SystemExit(f"the cluster did not reach {count} nodes: {result.stderr[-2000:]}")


def batch(args: list[str], env: dict, output: Path, kill=None) -> dict:
    command = [sys.executable, "-c", "from cli import main; main()", "swap", *args, "-o", str(output),
               "--ray-address", f"127.0.0.1:{PORT}"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = False
    if kill is not None:
        while process.poll() is None and not killed:
            for manifest in output.glob(".*.apple-video-job/manifest.json"):
                try:
                    rendered = json.loads(manifest.read_text())["rendered"]
                except (OSError, ValueError, KeyError):
                    continue
                if rendered:
                    kill()
                    killed = True
                    break
            time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=900)
    return {"rc": process.returncode, "stdout": stdout, "stderr": stderr, "killed": killed}


def main(data: Path, args: list[str]) -> None:
    temp = Path(tempfile.mkdtemp(prefix="avray-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ray = str(BIN / "ray")
    common = ["--node-ip-address", "127.0.0.1", "--temp-dir", str(temp), "--block", "--disable-usage-stats"]
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(start([ray, "start", "--head", "--port", str(PORT), "--num-cpus", "1",
                            "--include-dashboard", "false", *ports(0), *common], env, temp / "head.log"))
        wait_started(temp / "head.log")
        join = ["start", "--address", f"127.0.0.1:{PORT}", *common]
        nodes.append(start([ray, *join, *ports(1), "--num-cpus", "1"], env, temp / "worker1.log"))
        wait_started(temp / "worker1.log")
        blind = (f"set -e; mount -t tmpfs tmpfs {data}; test -z \"$(ls -A {data})\"; "
                 f"exec {ray} {' '.join(join)} {' '.join(ports(2))} --num-cpus 2")
        nodes.append(start(["unshare", "-m", "bash", "-c", blind], env, temp / "worker2.log"))
        wait_started(temp / "worker2.log")
        wait_nodes(env, 3)
        first = batch(args, env, data / "out_ray")
        second = batch(args, env, data / "out_killed", kill=lambda: stop(nodes[1]))
        print(json.dumps({"undisturbed": first, "killed": second}))
    finally:
        for node in reversed(nodes):
            stop(node)
        subprocess.run(["rm", "-rf", str(temp)], check=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])

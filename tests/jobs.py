"""A running job watched from its job folder, as the tests see it (the product has no test hook)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from apple_video.engine.layout import MANIFEST, job_dir_for


def manifest_of(output: Path) -> dict | None:
    """The job's manifest as it is on disk now, or None (not written yet, or mid-write)."""
    try:
        return json.loads((job_dir_for(output) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def wait_until_rendered(process: subprocess.Popen, output: Path, seconds: float) -> None:
    """Return once the job writing `output` has rendered a chunk, has ended, or `seconds` have passed."""
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        if (manifest_of(output) or {}).get("rendered"):
            return
        time.sleep(0.02)

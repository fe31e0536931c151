"""Where a job keeps its state beside its output: read by the planner (resume, `--force`) and the runner."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

MANIFEST = "manifest.json"  # the job's record: chunks analysed and rendered, the joined output


def job_dir_for(output: Path) -> Path:
    """The job folder: `.NAME.apple-video-job/` beside a file output, `.apple-video-job/` inside a folder output."""
    if output.suffix:
        return output.parent / f".{output.name}.apple-video-job"
    return output / ".apple-video-job"


def lock_path_for(output: Path) -> Path:
    job_dir = job_dir_for(output)
    return job_dir.with_name(f"{job_dir.name}.lock")


def file_identity(path: Path) -> list[int]:
    """[inode, size, mtime ns]: a rename keeps all three, so a file recorded before its rename is known after it."""
    stat = path.stat()
    return [stat.st_ino, stat.st_size, stat.st_mtime_ns]


def joined_earlier(output: Path) -> bool:
    """The output in place is the very file its job folder joined: the run was stopped after putting it in place,
    before its job folder was removed (a rerun only removes the folder)."""
    try:
        manifest = json.loads((job_dir_for(output) / MANIFEST).read_text())
        return manifest.get("joined") == file_identity(output)
    except (OSError, ValueError, AttributeError):
        return False


def remove_job_dir(job_dir: Path) -> None:
    """Remove a finished job's folder, its manifest last: a run stopped while removing still finds its record."""
    if not job_dir.is_dir():
        return
    for entry in job_dir.iterdir():
        if entry.name == MANIFEST:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    (job_dir / MANIFEST).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        job_dir.rmdir()

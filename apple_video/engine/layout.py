"""Where a job keeps its state beside its output: read by the planner (resume, `--force`) and the runner."""

from __future__ import annotations

import json
import os
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


def removing_dir_for(output: Path) -> Path:
    """Where a finished job's folder goes to be deleted: renamed there first, so the folder vanishes in one step."""
    job_dir = job_dir_for(output)
    return job_dir.with_name(f"{job_dir.name}.removing")


def remove_job_dir(output: Path) -> None:
    """Remove a finished job's folder: renamed away at once (a run stopped at any moment leaves either the whole
    folder, manifest included, or none), then deleted; a folder left half-deleted by a kill is deleted by the next
    run on this output (`remove_leftovers`)."""
    job_dir, removing = job_dir_for(output), removing_dir_for(output)
    if not job_dir.is_dir():
        return
    shutil.rmtree(removing, ignore_errors=True)
    os.replace(job_dir, removing)
    shutil.rmtree(removing, ignore_errors=True)


def remove_leftovers(output: Path) -> None:
    """A job folder a stopped run was deleting."""
    shutil.rmtree(removing_dir_for(output), ignore_errors=True)

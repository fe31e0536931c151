"""Where a job keeps its state beside its output: read by the planner (resume, `--force`) and the runner."""

from __future__ import annotations

from pathlib import Path


def job_dir_for(output: Path) -> Path:
    """The job folder: `.NAME.apple-video-job/` beside a file output, `.apple-video-job/` inside a folder output."""
    if output.suffix:
        return output.parent / f".{output.name}.apple-video-job"
    return output / ".apple-video-job"


def lock_path_for(output: Path) -> Path:
    job_dir = job_dir_for(output)
    return job_dir.with_name(f"{job_dir.name}.lock")

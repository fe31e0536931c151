"""Output-path rules shared by every writer: no overwrite without --force, never the input, temp + rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from apple_video.errors import InputError, OutputError


def temp_path_for(path: Path) -> Path:
    """A hidden sibling used while writing, so a crash never leaves a half-written output."""
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield the temp path to write `path` through (a file, or a folder the caller makes); it takes `path`'s place
    in one rename when the block ends, and is removed when the block raises (the old `path` stays as it was).
    A folder replaces an existing folder of the same name (removed just before the rename)."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def check_input(path: Path) -> Path:
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(f"input is empty (0 bytes): {path}")
    return path


def check_writable(folder: Path) -> None:
    """Try a file in the folder now: a read-only or foreign folder fails here, not after the work is done."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".apple-video-probe-"):
            pass
    except OSError as error:
        raise OutputError(f"cannot write to the folder {folder}: {error.strerror or error}") from None


def check_output(output: Path, inputs: list[Path], force: bool) -> Path:
    """Refuse outputs that would lose data or cannot be written."""
    resolved = output.resolve()
    for source in inputs:
        if source.exists() and resolved == source.resolve():
            raise OutputError(f"output path equals an input: {output}")
    if not resolved.parent.is_dir():
        raise OutputError(f"output directory does not exist: {output.parent}")
    if output.exists() and not force:
        raise OutputError(f"output exists: {output} (use --force to overwrite)")
    check_writable(resolved.parent)
    return output

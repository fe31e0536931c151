"""Rows run through a model in calls of one size. A model's float results depend on its batch's size (other
kernels, other compiled graphs), so a row must come out the same at the end of a group as in its middle: every
call gets exactly `size` rows, a short last one padded with copies of its last row whose results are dropped."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

R = TypeVar("R")  # anything sliced by rows: a list, an array, a tensor


def batch_rows(count: int, size: int, pad: bool = True) -> list[tuple[list[int], int]]:
    """(row indices, how many of them are real) per call, for `count` rows in calls of `size`. With `pad`, every
    call has `size` indices (the last call repeats its last row); without, the last call is just shorter."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    calls = []
    for start in range(0, count, size):
        real = list(range(start, min(start + size, count)))
        calls.append((real + [real[-1]] * (size - len(real)) if pad else real, len(real)))
    return calls


def run_in_batches(count: int, size: int, run: Callable[[list[int]], R], pad: bool = True) -> list[R]:
    """Each call's results, `run(row indices)` cut to its real rows (see `batch_rows`); the caller joins them."""
    return [run(rows)[:real] for rows, real in batch_rows(count, size, pad)]

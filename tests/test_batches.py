"""Rows in model calls of one size: the padding both the renderer and the compiled pipeline rely on (the
renderer's use: test_sampling's student test at 2 crops per call)."""

from __future__ import annotations

import pytest

from apple_video.batches import batch_rows, run_in_batches


def test_short_last_call_repeats_its_last_row() -> None:
    assert batch_rows(5, 3) == [([0, 1, 2], 3), ([3, 4, 4], 2)]
    assert batch_rows(2, 4) == [([0, 1, 1, 1], 2)]
    assert batch_rows(4, 2) == [([0, 1], 2), ([2, 3], 2)]
    assert batch_rows(0, 3) == []


def test_without_padding_the_last_call_is_shorter() -> None:
    assert batch_rows(5, 3, pad=False) == [([0, 1, 2], 3), ([3, 4], 2)]


def test_padding_results_are_dropped_and_every_call_has_the_size() -> None:
    sizes: list[int] = []

    def run(rows: list[int]) -> list[str]:
        sizes.append(len(rows))
        return [f"row{i}" for i in rows]

    calls = run_in_batches(7, 3, run)
    assert sizes == [3, 3, 3]
    assert [row for call in calls for row in call] == [f"row{i}" for i in range(7)]


def test_batch_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        batch_rows(3, 0)

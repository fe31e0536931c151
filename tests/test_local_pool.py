"""The local executor's analysis helper (engine/executors.py): a forked process analyses a chunk while this one
works on another; who analysed a chunk never changes its result, and a helper that dies costs nothing but time."""

from __future__ import annotations

import functools
import os
import signal

import numpy as np
import pytest

from apple_video.engine.executors import ANALYZE, Done, LocalPool, Ticket, helper_allowed
from apple_video.engine.factories import EngineFactories
from apple_video.engine.workers import AnalyzeTask, ChunkInput
from apple_video.settings import SwapSettings
from apple_video.swappers.classic import ClassicSwapper

CHUNK = 6

pytestmark = pytest.mark.skipif(not helper_allowed(), reason="needs two cores and fork")


def _tickets(frames: list[np.ndarray]) -> list[Ticket]:
    settings = SwapSettings(swapper="classic")
    tickets = []
    for chunk, start in enumerate(range(0, len(frames), CHUNK)):
        images = tuple((i, frames[i]) for i in range(start, min(start + CHUNK, len(frames))))
        task = AnalyzeTask(0, chunk, settings, ChunkInput(images=images))
        tickets.append(Ticket(ANALYZE, 0, chunk, functools.partial(lambda t: (t,), task)))
    return tickets


def _run(pool: LocalPool, tickets: list[Ticket], after_first=lambda pool: None) -> dict[int, Done]:
    pool.submit(tickets)
    results: dict[int, Done] = {}
    try:
        while (done := pool.next_done()) is not None:
            assert done.error is None, done.error
            results[done.ticket.chunk] = done
            if len(results) == 1:
                after_first(pool)
    finally:
        pool.close()
    return results


def _counted(pool: LocalPool) -> list[int]:
    """Chunks this process analysed itself."""
    own: list[int] = []
    analyze = pool.analyzer.analyze

    def counting(task):
        own.append(task.chunk)
        return analyze(task)

    pool.analyzer.analyze = counting
    return own


def _factories() -> EngineFactories:
    return EngineFactories(swapper=ClassicSwapper)


def test_a_helper_process_analyses_chunks_and_changes_no_result(clip_frames) -> None:
    tickets = _tickets(clip_frames[:36])
    alone = _run(LocalPool(_factories(), helper=False), tickets)
    pool = LocalPool(_factories(), helper=True)
    own = _counted(pool)
    helped = _run(pool, tickets)
    assert sorted(helped) == sorted(alone) == list(range(len(tickets)))
    assert 0 < len(own) < len(tickets)  # both processes analysed chunks
    for chunk in alone:
        assert helped[chunk].result == alone[chunk].result, chunk  # faces and signatures, exactly
    assert pool.helper is None  # closed


def test_a_helper_that_dies_leaves_its_chunk_to_this_process(clip_frames) -> None:
    tickets = _tickets(clip_frames[:36])
    alone = _run(LocalPool(_factories(), helper=False), tickets)
    killed: list[int] = []

    def kill(pool: LocalPool) -> None:
        if pool.helper is not None:
            killed.append(pool.helper._process.pid)
            os.kill(pool.helper._process.pid, signal.SIGKILL)

    helped = _run(LocalPool(_factories(), helper=True), tickets, after_first=kill)
    assert killed
    assert {chunk: done.result for chunk, done in helped.items()} == {c: d.result for c, d in alone.items()}

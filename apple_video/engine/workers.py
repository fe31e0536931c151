"""The stage workers: functions of what they are sent (packets, frames, targets, the source identity), never of a
path. The local executor runs them in-process; on Ray each is a long-lived actor serving every clip of a run."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from itertools import islice

import numpy as np

from apple_video.engine.analysis import Analyzer, face_to_dict
from apple_video.engine.factories import EngineFactories
from apple_video.engine.render import Renderer, RenderGroup, RenderStats
from apple_video.faces.track import frame_signature
from apple_video.faces.types import FaceTarget, SourceFace
from apple_video.media.video import (
    ChunkPackets,
    VideoInfo,
    decode_packets,
    deepen,
    encode_chunk,
    from_display,
    to_display,
)
from apple_video.prefetch import prefetch
from apple_video.settings import SwapSettings

Frames = Iterator[tuple[int, int, np.ndarray]]  # (frame index, pts, display-oriented rgb)


def batched(items, size: int):
    """Groups of `size` consecutive items (itertools.batched arrives in Python 3.12)."""
    iterator = iter(items)
    while group := list(islice(iterator, size)):
        yield group


@dataclass(frozen=True)
class ChunkInput:
    """One chunk's frames as data: a video's compressed packets, or a frame folder's decoded frames."""

    packets: ChunkPackets | None = None
    rotation: int = 0
    images: tuple[tuple[int, np.ndarray], ...] = ()  # (frame index, rgb) of a frame folder

    def frames(self, deep: dict[int, np.ndarray] | None = None) -> Frames:
        """8-bit frames; a clip's 16-bit pixels (deeper than 8 bits), display-oriented, go into `deep` by index."""
        if self.packets is None:
            for index, rgb in self.images:
                yield index, index, rgb
            return
        for frame in decode_packets(self.packets):
            if deep is not None and frame.deep is not None:
                deep[frame.index] = to_display(frame.deep, self.rotation)
            yield frame.index, frame.pts, to_display(frame.rgb, self.rotation)


@dataclass(frozen=True)
class AnalyzeTask:
    clip: int  # the clip key of its run
    chunk: int
    settings: SwapSettings
    media: ChunkInput


@dataclass(frozen=True)
class AnalyzeResult:
    clip: int  # the clip key of its run
    chunk: int
    faces: dict[str, list[dict]]
    signatures: dict[str, list]


@dataclass(frozen=True)
class RenderTask:
    clip: int  # the clip key of its run
    chunk: int
    settings: SwapSettings  # the clip's (its encoder follows its container)
    media: ChunkInput
    targets: dict[int, list[FaceTarget]]
    info: VideoInfo | None = None  # a video's: encode the chunk like it
    suffix: str = ".mp4"


@dataclass(frozen=True)
class RenderResult:
    clip: int  # the clip key of its run
    chunk: int
    stats: RenderStats
    encoded: bytes | None = None  # a video chunk, in the output's container format
    swapped: tuple[tuple[int, np.ndarray], ...] = ()  # a frame folder's changed frames (display rgb)


@dataclass
class WorkerReport:
    """What one render worker did over its life: for the benchmark and the build-count test."""

    node: str
    builds: int = 0
    lifetime: float = 0.0  # seconds since the worker was made
    busy: float = 0.0  # seconds inside render calls
    swap: float = 0.0  # seconds inside the model's swap calls
    chunks: int = 0


class AnalyzeWorker:
    """Stage 2: decode a chunk and detect faces. One detector per detector setting, kept for every clip."""

    def __init__(self, factories: EngineFactories) -> None:
        self.factories = factories
        self._analyzers: dict[object, Analyzer] = {}

    def analyze(self, task: AnalyzeTask) -> AnalyzeResult:
        key = task.settings.detector
        if key not in self._analyzers:
            self._analyzers[key] = Analyzer(self.factories.detector(key))
        signatures: dict[str, list] = {}

        def noted() -> Frames:  # each frame's thumbnail signature (for cut detection) on the way
            for index, pts, rgb in task.media.frames():
                signatures[str(index)] = frame_signature(rgb).tolist()
                yield index, pts, rgb

        faces = self._analyzers[key].analyze(noted())
        return AnalyzeResult(task.clip, task.chunk, {str(i): [face_to_dict(f) for f in fs] for i, fs in faces.items()},
                             signatures)


class RenderWorker:
    """Stage 4 (one per GPU): builds the swapper once, then swaps + pastes + encodes chunks of every clip."""

    def __init__(self, factories: EngineFactories) -> None:
        self.created = time.perf_counter()
        self.report_ = WorkerReport(node=_node_name())
        self.swapper = factories.swapper()
        self.files = factories.files
        self.report_.builds += 1
        self._current: tuple[int, Renderer] | None = None  # the clip being rendered, and its renderer

    def _renderer(self, task: RenderTask, sources: list[SourceFace]) -> Renderer:
        if self._current is None or self._current[0] != task.clip:
            self._current = (task.clip, Renderer(task.settings, self.swapper, sources, self.files))
        renderer = self._current[1]
        renderer.new_chunk()
        return renderer

    def render(self, task: RenderTask, sources: list[SourceFace]) -> RenderResult:
        started = time.perf_counter()
        renderer = self._renderer(task, sources)
        deep: dict[int, np.ndarray] = {}
        rendered = self._render_chunk(renderer, task.media.frames(deep), task.targets)
        stats = RenderStats()
        encoded, swapped = None, []
        if task.info is not None:
            rotation = task.media.rotation

            def stored() -> Iterator[tuple[np.ndarray, int]]:
                for index, pts, rgb, _, part in rendered:
                    stats.add(part)
                    yield from_display(deepen(deep.pop(index, None), rgb), rotation), pts

            encoded = encode_chunk(stored(), task.info, task.settings.encode, task.suffix)
        else:
            for index, _, rgb, changed, part in rendered:
                stats.add(part)
                if changed:
                    swapped.append((index, rgb))
        self.report_.busy += time.perf_counter() - started
        self.report_.chunks += 1
        return RenderResult(task.clip, task.chunk, stats, encoded, tuple(swapped))

    def _swap(self, renderer: Renderer, group: RenderGroup) -> list:
        started = time.perf_counter()
        try:
            return renderer.swap(group)
        finally:
            self.report_.swap += time.perf_counter() - started

    def _render_chunk(self, renderer: Renderer, frames: Frames, targets: dict[int, list[FaceTarget]]):
        """Yield (index, pts, rgb, swapped, stats) per frame, in order. Decode and crop the next group (prefetch
        thread) and paste the previous one (finish thread) while the model swaps this one."""
        groups = (renderer.prepare(list(group), targets) for group in batched(frames, renderer.batch_size))
        with closing(prefetch(groups, depth=1)) as ahead, ThreadPoolExecutor(1, thread_name_prefix="finish") as finisher:
            pending = None
            for group in ahead:
                results = self._swap(renderer, group)
                if pending is not None:
                    yield from _with_stats(*pending.result())
                pending = finisher.submit(renderer.finish, group, results)
            if pending is not None:
                yield from _with_stats(*pending.result())

    def report(self) -> WorkerReport:
        self.report_.lifetime = time.perf_counter() - self.created
        return self.report_


def _with_stats(rendered: list, stats: RenderStats):
    """Hand the group's stats out with its first frame (the others carry none)."""
    for position, (index, pts, rgb, swapped) in enumerate(rendered):
        yield index, pts, rgb, swapped, stats if position == 0 else RenderStats()


def _node_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"

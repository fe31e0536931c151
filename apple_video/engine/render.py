"""Stage 4's work on a chunk: crop the selected faces, swap them, mask and paste them back."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from apple_video.batches import run_in_batches
from apple_video.faces.align import transform_points, warp_crop
from apple_video.faces.compose import mask_for
from apple_video.faces.occlusion import create_occlusion
from apple_video.faces.parsing import create_parser
from apple_video.faces.paste import paste_back
from apple_video.faces.types import FaceTarget
from apple_video.settings import SwapSettings
from apple_video.swappers.base import CropJob, SourceFace, Swapper
from apple_video.weights import ModelFiles

logger = logging.getLogger(__name__)


def track_seed(seed: int, track: int) -> int:
    """The noise seed of every face of one track: the same at every frame (the official student draws seed 0 for
    every image; a per-frame seed would make a still face flicker). Job seed 0, track 0 is the official seed 0."""
    return (seed * 1_000_003 + track) & 0x7FFFFFFF


@dataclass
class RenderStats:
    frames: int = 0
    swapped_frames: int = 0
    faces_swapped: int = 0
    faces_skipped: int = 0

    def add(self, other: RenderStats) -> None:
        self.frames += other.frames
        self.swapped_frames += other.swapped_frames
        self.faces_swapped += other.faces_swapped
        self.faces_skipped += other.faces_skipped


@dataclass
class RenderGroup:
    """A group of frames with their aligned target crops, ready for one swap call."""

    frames: list[tuple[int, int, np.ndarray]]
    jobs: list[CropJob] = field(default_factory=list)
    places: list[tuple[int, np.ndarray, np.ndarray | None, int, int]] = field(default_factory=list)
    # per job: (position in frames, alignment matrix, crop landmarks, track, frame index)


class Renderer:
    """Swap the selected faces of a chunk of frames and paste them back: `prepare` (crop), `swap` (model),
    `finish` (mask, paste). The three may run in different threads, one group apart; `finish` keeps order."""

    def __init__(self, settings: SwapSettings, swapper: Swapper, sources: list[SourceFace],
                 files: ModelFiles = ModelFiles()) -> None:
        self.settings = settings
        self.swapper = swapper
        self.parser = create_parser(settings.mask.parser, files)  # files: the planner's, EngineFactories.files
        self.occlusion = create_occlusion("occlusion" in settings.mask.types, files, settings.model.device)
        self._previous_masks: dict[int, tuple[int, np.ndarray]] = {}  # track -> (frame, parsing mask)
        swapper.prepare(sources)
        auto = settings.batch_size == "auto"
        self.batch_size = max(1, swapper.auto_batch_size() if auto else int(settings.batch_size))
        if auto and settings.executor == "ray" and 0 < (settings.num_gpus or 0) < 1:
            # actors sharing a GPU all see the same free memory when they start: each takes its share only
            self.batch_size = max(1, int(self.batch_size * settings.num_gpus))
        if auto:
            logger.info("batch size: %d crops per model call", self.batch_size)

    def new_chunk(self) -> None:
        """Forget the previous frames' masks: a chunk renders the same on whichever worker it lands."""
        self._previous_masks.clear()

    def _mask(self, landmarks, crop, track: int, frame: int) -> np.ndarray:
        """Feathered mask; parsing and occlusion masks are averaged with the track's previous frame (aligned crops
        share a frame of reference), which removes the one-frame flicker of per-frame segmentation."""
        mask = mask_for(landmarks, self.swapper.crop_size, self.settings, self.parser, crop, self.occlusion)
        if self.parser is None and self.occlusion is None:
            return mask  # landmark masks are already smooth: the landmarks are
        previous = self._previous_masks.get(track)
        self._previous_masks[track] = (frame, mask)
        if previous is not None and previous[0] == frame - 1:
            mask = 0.5 * (mask + previous[1])
        return mask

    def prepare(self, frames: list[tuple[int, int, np.ndarray]], targets: dict[int, list[FaceTarget]]) -> RenderGroup:
        size = self.swapper.crop_size
        group = RenderGroup(frames)
        for position, (index, _, rgb) in enumerate(frames):
            for target in targets.get(index, []):
                matrix = self.swapper.crop_matrix(target.kps, target.landmarks)
                landmarks = transform_points(target.landmarks, matrix) if target.landmarks is not None else None
                group.jobs.append(CropJob(warp_crop(rgb, matrix, size), landmarks,
                                          track_seed(self.settings.seed, target.track_id)))
                group.places.append((position, matrix, landmarks, target.track_id, index))
        return group

    def swap(self, group: RenderGroup) -> list[np.ndarray | None]:
        jobs = group.jobs
        # full batches for a model whose float results depend on the batch's size: a frame comes out the same at
        # the end of a chunk as in its middle
        calls = run_in_batches(len(jobs), self.batch_size, lambda rows: self.swapper.swap([jobs[i] for i in rows]),
                               pad=not self.swapper.per_crop)
        return [result for call in calls for result in call]

    def finish(self, group: RenderGroup, results: list[np.ndarray | None]):
        """Return [(index, pts, rgb, swapped)] and stats. Frames without targets are returned as given."""
        outputs = [[index, pts, rgb, False] for index, pts, rgb in group.frames]
        stats = RenderStats(frames=len(group.frames))
        for job, (position, matrix, landmarks, track, frame), swapped in zip(group.jobs, group.places, results,
                                                                                strict=True):
            if swapped is None:
                stats.faces_skipped += 1
                continue
            entry = outputs[position]
            entry[2] = paste_back(entry[2], swapped, matrix, self._mask(landmarks, job.crop, track, frame))
            entry[3] = True
            stats.faces_swapped += 1
        stats.swapped_frames = sum(1 for entry in outputs if entry[3])
        return [tuple(entry) for entry in outputs], stats

    def render(self, frames: list[tuple[int, int, np.ndarray]], targets: dict[int, list[FaceTarget]]):
        """prepare, swap and finish one group in this thread."""
        group = self.prepare(frames, targets)
        return self.finish(group, self.swap(group))

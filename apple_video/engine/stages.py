"""The stage functions shared by the local and the Ray executors: analyze a chunk, render a chunk."""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apple_video.faces.align import alignment_matrix, transform_points, warp_crop
from apple_video.faces.detect import ScaleSearch, create_detector
from apple_video.faces.mask import feather, hull_mask, oval_mask, pad_mask, parsing_mask
from apple_video.faces.parsing import FaceParser, create_parser
from apple_video.faces.paste import paste_back
from apple_video.faces.types import Face, FaceTarget
from apple_video.settings import SwapSettings
from apple_video.swappers.base import CropJob, SourceFace, Swapper

logger = logging.getLogger(__name__)


def face_to_dict(face: Face) -> dict:
    return {
        "bbox": face.bbox.tolist(),
        "kps": face.kps.tolist(),
        "score": face.score,
        "landmarks": None if face.landmarks is None else face.landmarks.tolist(),
        "embedding": None if face.embedding is None else face.embedding.tolist(),
    }


def face_from_dict(data: dict) -> Face:
    def arr(key: str) -> np.ndarray | None:
        return None if data[key] is None else np.asarray(data[key], np.float64)

    return Face(arr("bbox"), arr("kps"), float(data["score"]), arr("landmarks"), arr("embedding"))


def target_to_dict(target: FaceTarget) -> dict:
    return {"frame": target.frame_index, "track": target.track_id, "kps": target.kps.tolist(),
            "landmarks": None if target.landmarks is None else target.landmarks.tolist()}


def target_from_dict(data: dict) -> FaceTarget:
    landmarks = None if data["landmarks"] is None else np.asarray(data["landmarks"], np.float64)
    return FaceTarget(data["frame"], data["track"], np.asarray(data["kps"], np.float64), landmarks)


def face_seed(seed: int, frame: int, track: int) -> int:
    """A per-face seed that does not depend on chunking or on which worker runs it."""
    return zlib.crc32(f"{seed}:{frame}:{track}".encode()) & 0x7FFFFFFF


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


class Analyzer:
    """Detect faces (boxes, landmarks, embeddings) on every frame of a chunk."""

    def __init__(self, settings: SwapSettings, embed_every: int = 8) -> None:
        self.detector = create_detector(settings.detector, announce=False)
        self.embed_every = embed_every

    def analyze(self, frames) -> dict[int, list[Face]]:
        """Identity embeddings (costly) only every `embed_every` frames and where the face count changes:
        tracks average them, which is all selection needs."""
        found: dict[int, list[Face]] = {}
        previous = -1
        search = ScaleSearch(self.detector)
        for index, _, rgb in frames:
            faces = search.detect(index, rgb, embed=False)
            if faces and (index % self.embed_every == 0 or len(faces) != previous):
                embed = getattr(self.detector, "embed", None)
                faces = (embed(rgb, faces) if embed and self.detector.settings.angles == (0,)
                         else self.detector.detect(rgb, True, search.used))
            previous = len(faces)
            found[index] = faces
        return found


def mask_for(target_landmarks: np.ndarray | None, size: int, settings: SwapSettings, parser: FaceParser | None = None,
             crop: np.ndarray | None = None) -> np.ndarray:
    """Feathered mask of the regions to replace, in crop space: parsing when a parser is given, else landmarks."""
    if parser is not None and crop is not None:
        hard = parsing_mask(parser.labels(crop), settings.mask.regions)
    elif target_landmarks is not None:
        hard = hull_mask(target_landmarks, size, settings.mask.regions)
    else:
        hard = oval_mask(size)
    return feather(pad_mask(hard, settings.mask.padding), settings.mask.blur)


class Renderer:
    """Swap the selected faces of a chunk of frames and paste them back."""

    def __init__(self, settings: SwapSettings, swapper: Swapper, sources: list[SourceFace]) -> None:
        self.settings = settings
        self.swapper = swapper
        self.parser = create_parser(settings.mask.parser)
        self._previous_masks: dict[int, tuple[int, np.ndarray]] = {}  # track -> (frame, parsing mask)
        swapper.prepare(sources)

    def _mask(self, landmarks, crop, track: int, frame: int) -> np.ndarray:
        """Feathered mask; parsing masks are averaged with the track's previous frame (aligned crops share a frame
        of reference), which removes the one-frame flicker of per-frame segmentation."""
        mask = mask_for(landmarks, self.swapper.crop_size, self.settings, self.parser, crop)
        if self.parser is None:
            return mask  # landmark masks are already smooth: the landmarks are
        previous = self._previous_masks.get(track)
        self._previous_masks[track] = (frame, mask)
        if previous is not None and previous[0] == frame - 1:
            mask = 0.5 * (mask + previous[1])
        return mask

    def render(self, frames: list[tuple[int, int, np.ndarray]], targets: dict[int, list[FaceTarget]]):
        """Return [(index, pts, rgb, swapped)] and stats. Frames without targets are returned as given."""
        size = self.swapper.crop_size
        jobs, places = [], []
        for position, (index, _, rgb) in enumerate(frames):
            for target in targets.get(index, []):
                matrix = alignment_matrix(target.kps, size)
                landmarks = transform_points(target.landmarks, matrix) if target.landmarks is not None else None
                jobs.append(CropJob(warp_crop(rgb, matrix, size), landmarks,
                                    face_seed(self.settings.seed, index, target.track_id)))
                places.append((position, matrix, landmarks, jobs[-1].crop, target.track_id, index))
        results: list[np.ndarray | None] = []
        for start in range(0, len(jobs), max(1, self.settings.batch_size)):
            results.extend(self.swapper.swap(jobs[start : start + self.settings.batch_size]))
        outputs = [[index, pts, rgb, False] for index, pts, rgb in frames]
        stats = RenderStats(frames=len(frames))
        for (position, matrix, landmarks, crop, track, frame), swapped in zip(places, results, strict=True):
            if swapped is None:
                stats.faces_skipped += 1
                continue
            entry = outputs[position]
            entry[2] = paste_back(entry[2], swapped, matrix, self._mask(landmarks, crop, track, frame))
            entry[3] = True
            stats.faces_swapped += 1
        stats.swapped_frames = sum(1 for entry in outputs if entry[3])
        return [tuple(entry) for entry in outputs], stats


def write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)

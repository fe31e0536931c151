"""`apple-video prepare-data`: a face data set -> aligned crops, parsing maps, landmarks, identity embeddings, in shards.

Input: one folder per identity (VGGFace2-HQ style), or a flat folder plus an identity list (CSV lines
`file,identity`). Output: `shards/shard_XXXXX/` (memory-mappable .npy files) + `manifest.json`. Resumable (finished shards are kept),
parallel (a process pool), and unreadable or faceless images are skipped, counted and listed. The manifest
records where the parsing maps, landmarks and iris points come from (the official data uses BiSeNet + an
occlusion model, 3DDFA-V3 landmarks and MediaPipe Iris; see `provenance`).
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from apple_video import weights
from apple_video.errors import InputError, UserError
from apple_video.faces.align import alignment_matrix, transform_points, warp_crop
from apple_video.faces.detect import DetectorSettings, create_detector
from apple_video.faces.parsing import create_parser
from apple_video.faces.select import sort_faces
from apple_video.faces.sources import presize_source
from apple_video.media.images import is_image_path, read_image
from training.deblur import hull_labels, teacher_condition

logger = logging.getLogger(__name__)

MASK_SOURCES = {True: "bisenet-parsing", False: "landmark-hull"}


def provenance(parsed: bool) -> dict[str, str]:
    """What stands in for the official preprocessing, recorded in the manifest."""
    return {"mask_source": MASK_SOURCES[parsed], "landmarks": "dlib-68", "irises": "estimated-from-eye-landmarks"}


@dataclass(frozen=True)
class Item:
    path: str
    identity: str


def scan(raw: Path, identity_list: Path | None = None) -> tuple[list[Item], list[str]]:
    """Images with their identity, and warnings about identities that cannot be used."""
    if not raw.is_dir():
        raise InputError(f"data folder not found: {raw}")
    warnings: list[str] = []
    items: list[Item] = []
    if identity_list is not None:
        with identity_list.open() as handle:
            for row in csv.reader(handle):
                if len(row) >= 2 and not row[0].startswith("#"):
                    items.append(Item(str(raw / row[0].strip()), row[1].strip()))
    else:
        for folder in sorted(p for p in raw.iterdir() if p.is_dir()):
            images = sorted(p for p in folder.iterdir() if p.is_file() and is_image_path(p))
            if not images:
                warnings.append(f"identity '{folder.name}' has no images: ignored")
            items.extend(Item(str(p), folder.name) for p in images)
    if not items:
        raise InputError(f"no images found under {raw} (expected one folder per identity, or --identity-list)")
    return items, warnings


class _Worker:
    """Per-process detector (built once per process)."""

    detector = None
    parser = None
    size = 512

    @classmethod
    def setup(cls, size: int) -> None:
        cls.detector = create_detector(DetectorSettings(name="dlib"))
        cls.parser = create_parser("auto", announce=False)
        cls.size = size

    @classmethod
    def process(cls, item: Item) -> dict | str:
        try:
            rgb = presize_source(read_image(item.path).rgb)  # as swap and eval see a source photo
        except InputError as error:
            return f"unreadable: {error}"
        faces = cls.detector.detect(rgb)
        if not faces:
            return "no face found"
        face = sort_faces(faces, "large-small")[0]
        matrix = alignment_matrix(face.kps, cls.size)
        crop = warp_crop(rgb, matrix, cls.size)
        landmarks = transform_points(face.landmarks, matrix)
        labels = cls.parser.labels(crop) if cls.parser is not None else hull_labels(landmarks, cls.size)
        return {"image": crop, "labels": labels, "landmarks": landmarks.astype(np.float32),
                "embedding": np.asarray(face.embedding, np.float32), "identity": item.identity, "path": item.path}


SHARD_KEYS = ("images", "labels", "landmarks", "embeddings", "identities")


def write_shard(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A shard is a folder of .npy files (memory-mappable: training reads single samples, not whole shards),
    written under a temporary name and renamed when complete."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for key, value in arrays.items():
        np.save(tmp / f"{key}.npy", value)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _write_shard(path: Path, records: list[dict]) -> None:
    write_shard(path, {
        "images": np.stack([r["image"] for r in records]), "labels": np.stack([r["labels"] for r in records]),
        "landmarks": np.stack([r["landmarks"] for r in records]), "embeddings": np.stack([r["embedding"] for r in records]),
        "identities": np.array([r["identity"] for r in records]), "paths": np.array([r["path"] for r in records]),
    })


class ShardArray:
    """One array spread over shards (memory-mapped), indexed by a global sample number."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return np.asarray(self.parts[shard][index - self.offsets[shard]])


def open_shards(folder: Path, names: list[str], keys: tuple[str, ...]) -> dict[str, ShardArray]:
    return {key: ShardArray([np.load(folder / name / f"{key}.npy", mmap_mode="r") for name in names]) for key in keys}


def prepare_data(raw: Path, output: Path, size: int, identity_list: Path | None = None, workers: int = 1,
                 shard_size: int = 256) -> dict:
    items, warnings = scan(raw, identity_list)
    for line in warnings:
        logger.warning(line)
    output.mkdir(parents=True, exist_ok=True)
    (output / "shards").mkdir(exist_ok=True)
    manifest_path = output / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if manifest and manifest.get("crop_size") != size:
        raise UserError(f"{output} holds crops of size {manifest.get('crop_size')}, not {size}: use another folder")
    source = provenance(weights.is_present("bisenet-parsing"))
    if manifest and manifest.get("mask_source") != source["mask_source"]:
        raise UserError(f"{output} was prepared with {manifest.get('mask_source')} masks, now {source['mask_source']}: "
                        "use another folder")
    if source["mask_source"] == "landmark-hull":
        logger.warning("no BiSeNet parsing weights: the teacher's blur region is the landmark hull, without glasses "
                       "(see `apple-video weights where`)")
    manifest = {"crop_size": size, "shards": [], "skipped": [], **source, **manifest}
    done = {path for shard in manifest["shards"] for path in shard["sources"]} | {s["path"] for s in manifest["skipped"]}
    todo = [item for item in items if item.path not in done]
    groups = [todo[i : i + shard_size] for i in range(0, len(todo), shard_size)]
    context = multiprocessing.get_context("spawn") if workers > 1 else None
    pool = context.Pool(workers, initializer=_Worker.setup, initargs=(size,)) if context else None
    if pool is None:
        _Worker.setup(size)
    try:
        with tqdm(total=len(todo), desc="prepare", unit="img", disable=None) as bar:
            for group in groups:
                results = pool.map(_Worker.process, group) if pool else [_Worker.process(item) for item in group]
                records = [r for r in results if isinstance(r, dict)]
                skipped = [{"path": item.path, "reason": r} for item, r in zip(group, results, strict=True) if isinstance(r, str)]
                if records:
                    name = f"shard_{len(manifest['shards']):05d}"
                    _write_shard(output / "shards" / name, records)
                    manifest["shards"].append({"file": name, "count": len(records), "sources": [r["path"] for r in records]})
                manifest["skipped"].extend(skipped)
                tmp = manifest_path.with_name(".manifest.tmp")
                tmp.write_text(json.dumps(manifest, indent=1))
                tmp.replace(manifest_path)
                bar.update(len(group))
    finally:
        if pool:
            pool.close()
    for entry in manifest["skipped"][-20:]:
        logger.warning("skipped %s: %s", entry["path"], entry["reason"])
    return manifest


@dataclass
class FaceData:
    """Prepared crops, memory-mapped from the shards: a sample is read when it is used."""

    images: ShardArray  # (N, S, S, 3) uint8
    labels: ShardArray  # (N, S, S) uint8 CelebAMask-HQ classes (BiSeNet, or 1 inside the landmark hull)
    landmarks: ShardArray  # (N, 68, 2)
    embeddings: ShardArray  # (N, 128)
    identities: np.ndarray  # (N,) str, in memory

    @classmethod
    def load(cls, folder: Path) -> FaceData:
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise InputError(f"not a prepared data set (no manifest.json): {folder}; run `apple-video prepare-data` first")
        manifest = json.loads(manifest_path.read_text())
        names = [shard["file"] for shard in manifest["shards"]]
        if not names:
            raise InputError(f"the prepared data set {folder} holds no usable faces")
        if "mask_source" not in manifest:
            raise InputError(f"{folder} was prepared by an older version (no parsing maps): run prepare-data into a new folder")
        arrays = open_shards(folder / "shards", names, SHARD_KEYS)
        identities = np.concatenate([np.load(folder / "shards" / n / "identities.npy") for n in names])
        return cls(arrays["images"], arrays["labels"], arrays["landmarks"], arrays["embeddings"], identities)

    def condition(self, index: int) -> np.ndarray:
        """The teacher's `blur_landmark_iris` condition of sample `index`."""
        return teacher_condition(self.images[index], self.landmarks[index], self.labels[index])

    def identity_image(self, index: int):
        """Sample `index` as the identity encoder sees it."""
        from training.loop import IdentityImage

        return IdentityImage(self.images[index], self.landmarks[index], self.embeddings[index], int(index))

    def by_identity(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for index, name in enumerate(self.identities):
            groups.setdefault(str(name), []).append(index)
        return groups

    def pairable(self) -> dict[str, list[int]]:
        """Identities with at least two images (a target and another image for the identity condition)."""
        groups = self.by_identity()
        single = sorted(name for name, idx in groups.items() if len(idx) < 2)
        if single:
            logger.warning("%d identities have a single image and cannot be paired: %s", len(single), ", ".join(single[:5]))
        usable = {name: idx for name, idx in groups.items() if len(idx) >= 2}
        if not usable:
            raise UserError("no identity has two or more images: the teacher needs pairs of the same person")
        return usable

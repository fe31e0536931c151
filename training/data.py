"""`apple-video prepare-data`: a face data set -> aligned crops, face masks, identity embeddings, in shards.

Input: one folder per identity (VGGFace2-HQ style), or a flat folder plus an identity list (CSV lines
`file,identity`). Output: `shards/shard_XXXXX.npz` + `manifest.json`. Resumable (finished shards are kept),
parallel (a process pool), and unreadable or faceless images are skipped, counted and listed.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from apple_video.errors import InputError, UserError
from apple_video.faces.align import alignment_matrix, transform_points, warp_crop
from apple_video.faces.detect import DetectorSettings, create_detector
from apple_video.faces.mask import hull_mask
from apple_video.faces.select import sort_faces
from apple_video.media.images import is_image_path, read_image

logger = logging.getLogger(__name__)

MASK_REGIONS = ("skin", "left-eyebrow", "right-eyebrow", "left-eye", "right-eye", "glasses", "nose", "mouth",
                "upper-lip", "lower-lip")


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
    size = 512

    @classmethod
    def setup(cls, size: int) -> None:
        cls.detector = create_detector(DetectorSettings(name="dlib"))
        cls.size = size

    @classmethod
    def process(cls, item: Item) -> dict | str:
        try:
            rgb = read_image(item.path).rgb
        except InputError as error:
            return f"unreadable: {error}"
        faces = cls.detector.detect(rgb)
        if not faces:
            return "no face found"
        face = sort_faces(faces, "large-small")[0]
        matrix = alignment_matrix(face.kps, cls.size)
        crop = warp_crop(rgb, matrix, cls.size)
        landmarks = transform_points(face.landmarks, matrix)
        return {"image": crop, "mask": hull_mask(landmarks, cls.size, MASK_REGIONS), "landmarks": landmarks.astype(np.float32),
                "embedding": np.asarray(face.embedding, np.float32), "identity": item.identity, "path": item.path}


def _write_shard(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, images=np.stack([r["image"] for r in records]), masks=np.stack([r["mask"] for r in records]),
             landmarks=np.stack([r["landmarks"] for r in records]), embeddings=np.stack([r["embedding"] for r in records]),
             identities=np.array([r["identity"] for r in records]), paths=np.array([r["path"] for r in records]))
    os.replace(tmp, path)


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
    manifest = {"crop_size": size, "shards": [], "skipped": [], **manifest}
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
                    name = f"shard_{len(manifest['shards']):05d}.npz"
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
    """All prepared crops in memory (toy and mid-size sets; large sets would stream shards)."""

    images: np.ndarray  # (N, S, S, 3) uint8
    masks: np.ndarray  # (N, S, S) uint8
    landmarks: np.ndarray  # (N, 68, 2)
    embeddings: np.ndarray  # (N, 128)
    identities: np.ndarray  # (N,) str

    @classmethod
    def load(cls, folder: Path) -> FaceData:
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise InputError(f"not a prepared data set (no manifest.json): {folder}; run `apple-video prepare-data` first")
        manifest = json.loads(manifest_path.read_text())
        parts = [np.load(folder / "shards" / shard["file"]) for shard in manifest["shards"]]
        if not parts:
            raise InputError(f"the prepared data set {folder} holds no usable faces")
        cat = {key: np.concatenate([p[key] for p in parts]) for key in ("images", "masks", "landmarks", "embeddings", "identities")}
        return cls(**cat)

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

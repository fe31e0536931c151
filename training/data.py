"""`apple-video prepare-data`: a face data set -> aligned crops, parsing maps, landmarks, identity embeddings, in shards.

Input: one folder per identity (VGGFace2-HQ style), or a flat folder plus an identity list (CSV lines
`file,identity`). Output: `shards/shard_XXXXX/` (memory-mappable .npy files) + `manifest.json`. Resumable (finished shards are kept),
parallel (a process pool), and unreadable or faceless images are skipped, counted and listed. The manifest
records where the parsing maps, blur region, landmarks, iris points and alignment points come from (the official
data uses BiSeNet + an occlusion model, 3DDFA-V3 landmarks and MediaPipe Iris; see `provenance`), how many images
were taken as distributed (already on the template) and the aesthetic threshold (images at or below it skipped).
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from tqdm import tqdm

from apple_video.errors import InputError, UserError, WeightsError
from apple_video.faces.align import alignment_matrix, kps_from_68, transform_points, warp_crop
from apple_video.faces.detect import INSIGHTFACE_DET, DetectorSettings, create_detector
from apple_video.faces.occlusion import OCCLUSION_WEIGHTS, create_occlusion
from apple_video.faces.parsing import PARSING_WEIGHTS, create_parser
from apple_video.faces.select import sort_faces
from apple_video.faces.sources import presize_source
from apple_video.media.images import is_image_path, read_image
from apple_video.media.paths import atomic_write
from apple_video.weights import ModelFiles
from training.aesthetic import AestheticScorer
from training.deblur import blur_region, hull_labels, irises_from_eyes, parse_official, teacher_condition
from training.iris import IrisSource, create_iris_model, iris_files, iris_points
from training.retina import RetinaPoints

logger = logging.getLogger(__name__)

AESTHETIC_WEIGHTS = ("aesthetic-clip-l14", "aesthetic-mlp")  # the LAION predictor's CLIP ViT-L/14 and its MLP head
OFFICIAL_MIN_AESTHETIC = 5.1  # the released teacher's data: VGGFace2-HQ images scoring above 5.1 (its run name)
MASK_SOURCES = {True: "bisenet-parsing", False: "landmark-hull"}
Framing = Literal["auto", "as-is", "align"]
# An image is taken as distributed when its face already sits on the crop template within these bounds (an aligned
# crop re-detected by dlib: scale within 0.3%, 1.4 degrees, 0.5% shift; photos of a centred face: scale off by 12%
# or more). Data aligned to a different template: --framing as-is.
ON_TEMPLATE_SCALE = (0.92, 1.08)
ON_TEMPLATE_DEGREES = 4.0
ON_TEMPLATE_SHIFT = 0.03  # of the image side


def provenance(parsed: bool, irises: str = "estimated-from-eye-landmarks", arcface_points: str = "dlib-68-derived",
               occlusion: bool = False, eva_points: str | None = None) -> dict[str, str]:
    """What stands in for the official preprocessing, recorded in the manifest."""
    region = ("bisenet-parsing+occlusion" if occlusion else "bisenet-parsing") if parsed else "landmark-hull"
    return {"mask_source": MASK_SOURCES[parsed], "blur_region": region,
            "parsing_normalisation": "imagenet-then-half" if parsed else "none", "landmarks": "dlib-68",
            "irises": irises, "arcface_points": arcface_points, "eva_points": eva_points or arcface_points}


@dataclass(frozen=True)
class Item:
    path: str
    identity: str


@dataclass(frozen=True)
class PrepareSettings:
    size: int
    framing: Framing = "auto"
    min_aesthetic: float | None = None
    irises: IrisSource = "auto"


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


def on_template(kps: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Whether a square image already holds its face on the crop template (VGGFace2-HQ as distributed)."""
    h, w = shape[:2]
    if h != w:
        return False
    matrix = alignment_matrix(kps, w)
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    degrees = float(np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0])))
    centre = transform_points(np.array([[w / 2, h / 2]]), matrix)[0] - np.array([w / 2, h / 2])
    return (ON_TEMPLATE_SCALE[0] <= scale <= ON_TEMPLATE_SCALE[1] and abs(degrees) <= ON_TEMPLATE_DEGREES
            and float(np.abs(centre).max()) <= ON_TEMPLATE_SHIFT * w)


def frame_face(rgb: np.ndarray, face, settings: PrepareSettings) -> tuple[np.ndarray, np.ndarray, str] | str:
    """(crop, its 68 landmarks, "as-distributed" | "re-aligned"), or why the image is refused."""
    size = settings.size
    keep = settings.framing == "as-is" or (settings.framing == "auto" and on_template(face.kps, rgb.shape))
    if keep:
        if rgb.shape[0] != rgb.shape[1]:
            return "not square: cannot be taken as it is (--framing as-is)"
        scale = size / rgb.shape[0]
        crop = rgb if rgb.shape[0] == size else cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
        return crop, np.asarray(face.landmarks, np.float64) * scale, "as-distributed"
    matrix = alignment_matrix(face.kps, size)
    return warp_crop(rgb, matrix, size), transform_points(face.landmarks, matrix), "re-aligned"


OcclusionModel = Callable[[np.ndarray], np.ndarray]  # aligned crop (S, S, 3) -> visible-face mask (S, S), nonzero = face


@dataclass(frozen=True)
class PrepareModels:
    """What prepare-data's workers build their models from, resolved once by `prepare_models` (the driver loads
    none of them). A test hands in its own stand-ins: a lambda is fine with one worker; several workers get a
    pickled copy, so theirs must be module-level functions or `functools.partial` of them."""

    files: ModelFiles  # the optional files that are present, and the required ones
    scorer: Callable[[], AestheticScorer] | None = None  # the aesthetic filter (--min-aesthetic)
    # the official preprocessing's DeepLabV3+ occlusion model (`apple_video/faces/occlusion.py`) as a crop ->
    # visible-face mask function, when its file is present; without it the blur region is the parsing alone
    occlusion: Callable[[], OcclusionModel | None] | None = None


OPTIONAL_WEIGHTS = (PARSING_WEIGHTS, OCCLUSION_WEIGHTS, INSIGHTFACE_DET, "retinaface-resnet50")


def prepare_models(min_aesthetic: float | None, irises: IrisSource) -> PrepareModels:
    """Prepare-data's model files, checked once before any work: the optional ones when present (parsing,
    occlusion, SCRFD's and RetinaFace's points, the iris model), the aesthetic filter's when it is on (one line
    naming what is missing)."""
    files = ModelFiles.present(OPTIONAL_WEIGHTS) + iris_files(irises)
    scorer = None
    if min_aesthetic is not None:
        aesthetic = ModelFiles.present(AESTHETIC_WEIGHTS)
        missing = [name for name in AESTHETIC_WEIGHTS if name not in aesthetic]
        if missing:
            raise WeightsError(f"the aesthetic filter (targets scoring above {min_aesthetic}) needs {' and '.join(missing)} "
                               "(`apple-video weights where`); `--min-aesthetic 0` prepares without it")
        files = files + aesthetic
        scorer = functools.partial(AestheticScorer.from_files, *(aesthetic(name) for name in AESTHETIC_WEIGHTS))
    occlusion = functools.partial(create_occlusion, True, files) if OCCLUSION_WEIGHTS in files else None
    return PrepareModels(files, scorer, occlusion)


class _Worker:
    """Per-process models (built once per process)."""

    detector = None
    parser = None
    scorer = None
    iris = None
    scrfd = None
    retina = None
    occlusion: OcclusionModel | None = None
    settings = PrepareSettings(512)

    @classmethod
    def setup(cls, settings: PrepareSettings, models: PrepareModels) -> None:
        files = models.files
        cls.detector = create_detector(DetectorSettings(name="dlib"))
        cls.parser = create_parser("auto", files, announce=False)
        cls.scorer = models.scorer() if settings.min_aesthetic is not None and models.scorer is not None else None
        cls.iris = create_iris_model(settings.irises, files)[0]
        cls.scrfd = create_detector(DetectorSettings(name="insightface", embeddings=False), files, announce=False) \
            if INSIGHTFACE_DET in files else None
        cls.retina = RetinaPoints.from_weights(files("retinaface-resnet50")) if "retinaface-resnet50" in files else None
        cls.occlusion = models.occlusion() if cls.parser is not None and models.occlusion is not None else None
        cls.settings = settings

    @classmethod
    def arcface_kps(cls, crop: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """The 5 points ArcFace and EVA are aligned on: SCRFD's (antelopev2, as the official code) when present."""
        if cls.scrfd is not None:
            found = cls.scrfd.detect(crop, embed=False)
            if found:
                return np.asarray(sort_faces(found, "large-small")[0].kps, np.float32)
        return kps_from_68(landmarks).astype(np.float32)

    @classmethod
    def process(cls, item: Item) -> dict | str:
        try:
            rgb = presize_source(read_image(item.path).rgb)  # as swap and eval see a source photo
        except InputError as error:
            return f"unreadable: {error}"
        faces = cls.detector.detect(rgb)
        if not faces:
            return "no face found"
        framed = frame_face(rgb, sort_faces(faces, "large-small")[0], cls.settings)
        if isinstance(framed, str):
            return framed
        crop, landmarks, framing = framed
        score = float("nan")
        if cls.scorer is not None:
            score = float(cls.scorer.score([crop])[0])
        # as the official data: the aesthetic filter picks targets; every image of a person stays an identity image
        target = cls.scorer is None or score > cls.settings.min_aesthetic
        size = cls.settings.size
        labels = parse_official(cls.parser, crop) if cls.parser is not None else hull_labels(landmarks, size)
        region = {"region": blur_region(labels, cls.occlusion(crop))} if cls.occlusion is not None else {}
        irises = iris_points(crop, landmarks, cls.iris) if cls.iris is not None else irises_from_eyes(landmarks)
        face = sort_faces(faces, "large-small")[0]
        kps = cls.arcface_kps(crop, landmarks)
        eva_kps = cls.retina(crop) if cls.retina is not None else None  # PuLID's points for EVA-CLIP
        return {"image": crop, "labels": labels, "landmarks": landmarks.astype(np.float32),
                "embedding": np.asarray(face.embedding, np.float32), "identity": item.identity, "path": item.path,
                "irises": irises.astype(np.float32), "kps": kps,
                "eva_kps": eva_kps if eva_kps is not None else kps, "framing": framing,
                "aesthetic": score, "target": target, **region}


SHARD_KEYS = ("images", "labels", "landmarks", "embeddings", "identities")
OPTIONAL_KEYS = ("irises", "kps", "eva_kps", "regions")  # newer shards; regions only with an occlusion model


def write_shard(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A shard is a folder of .npy files (memory-mappable: training reads single samples, not whole shards),
    written under a temporary name and renamed when complete."""
    with atomic_write(path) as tmp:
        tmp.mkdir(parents=True)
        for key, value in arrays.items():
            np.save(tmp / f"{key}.npy", value)


def _write_shard(path: Path, records: list[dict]) -> None:
    write_shard(path, {
        "images": np.stack([r["image"] for r in records]), "labels": np.stack([r["labels"] for r in records]),
        "landmarks": np.stack([r["landmarks"] for r in records]), "embeddings": np.stack([r["embedding"] for r in records]),
        "identities": np.array([r["identity"] for r in records]), "paths": np.array([r["path"] for r in records]),
        "irises": np.stack([r["irises"] for r in records]), "kps": np.stack([r["kps"] for r in records]),
        "eva_kps": np.stack([r["eva_kps"] for r in records]),
        "aesthetic": np.array([r["aesthetic"] for r in records], np.float32),
        "targets": np.array([r["target"] for r in records], bool),
        **({"regions": np.stack([r["region"] for r in records])} if all("region" in r for r in records) else {}),
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
                 shard_size: int = 256, framing: Framing = "auto", min_aesthetic: float | None = None,
                 irises: IrisSource = "auto", models: PrepareModels | None = None) -> dict:
    """Prepare the raw photos under `raw`; `models`: what the workers build their models from (default: the files
    `prepare_models` resolves)."""
    if min_aesthetic is not None and min_aesthetic <= 0:  # `--min-aesthetic 0`: no filter (LAION scores are 1..10)
        min_aesthetic = None
    settings = PrepareSettings(size, framing, min_aesthetic, irises)
    items, warnings = scan(raw, identity_list)
    for line in warnings:
        logger.warning(line)
    models = models or prepare_models(min_aesthetic, irises)  # one clear line now rather than in every worker
    if min_aesthetic is not None and models.scorer is None:
        raise ValueError("prepare_data: --min-aesthetic needs PrepareModels with a scorer")
    output.mkdir(parents=True, exist_ok=True)
    (output / "shards").mkdir(exist_ok=True)
    manifest_path = output / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if manifest and manifest.get("crop_size") != size:
        raise UserError(f"{output} holds crops of size {manifest.get('crop_size')}, not {size}: use another folder")
    iris_source = create_iris_model(irises, models.files)[1]
    arcface_points = "scrfd-antelopev2" if INSIGHTFACE_DET in models.files else "dlib-68-derived"
    eva_points = "retinaface-resnet50" if "retinaface-resnet50" in models.files else arcface_points
    parsed = PARSING_WEIGHTS in models.files
    occluded = parsed and models.occlusion is not None  # the file is checked here, the network loaded by the workers
    source = provenance(parsed, iris_source, arcface_points, occluded, eva_points)
    for key in ("mask_source", "blur_region", "irises"):
        if manifest and manifest.get(key, source[key]) != source[key]:
            raise UserError(f"{output} was prepared with {key} {manifest.get(key)}, now {source[key]}: use another folder")
    if source["mask_source"] == "landmark-hull":
        logger.warning("no BiSeNet parsing weights: the teacher's blur region is the landmark hull, without glasses "
                       "(see `apple-video weights where`)")
    if parsed and not occluded:
        logger.info("blur region: BiSeNet parsing without the occlusion model (recorded in the manifest)")
    filters = {"framing": framing, "min_aesthetic": min_aesthetic,
               "aesthetic_model": "laion-improved-aesthetic-predictor sac+logos+ava1-l14-linearMSE" if min_aesthetic else None}
    manifest = {"crop_size": size, "shards": [], "skipped": [], "framed": {"as-distributed": 0, "re-aligned": 0},
                "identity_only": [], **source, **filters, **manifest}
    done = {path for shard in manifest["shards"] for path in shard["sources"]} | {s["path"] for s in manifest["skipped"]}
    todo = [item for item in items if item.path not in done]
    groups = [todo[i : i + shard_size] for i in range(0, len(todo), shard_size)]
    context = multiprocessing.get_context("spawn") if workers > 1 else None
    pool = context.Pool(workers, initializer=_Worker.setup, initargs=(settings, models)) if context else None
    if pool is None:
        _Worker.setup(settings, models)
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
                    for record in records:
                        manifest["framed"][record["framing"]] += 1
                    # below the aesthetic threshold: kept as identity images, never drawn as targets
                    manifest["identity_only"].extend(r["path"] for r in records if not r["target"])
                manifest["skipped"].extend(skipped)
                with atomic_write(manifest_path) as tmp:
                    tmp.write_text(json.dumps(manifest, indent=1))
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
    irises: ShardArray | None = None  # (N, 10, 2) iris points (older data sets: estimated when used)
    kps: ShardArray | None = None  # (N, 5, 2) the points ArcFace is aligned on
    eva_kps: ShardArray | None = None  # (N, 5, 2) the points EVA-CLIP is aligned on
    regions: ShardArray | None = None  # (N, S, S) bool blur region (parsing ∩ occlusion) when an occlusion model ran
    is_target: np.ndarray | None = None  # (N,) bool, in memory: above the aesthetic threshold (None: every image)

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
        present = [k for k in OPTIONAL_KEYS if all((folder / "shards" / n / f"{k}.npy").is_file() for n in names)]
        arrays |= open_shards(folder / "shards", names, tuple(present))
        identities = np.concatenate([np.load(folder / "shards" / n / "identities.npy") for n in names])
        targets = [folder / "shards" / n / "targets.npy" for n in names]
        is_target = np.concatenate([np.load(p) for p in targets]) if all(p.is_file() for p in targets) else None
        return cls(arrays["images"], arrays["labels"], arrays["landmarks"], arrays["embeddings"], identities,
                   arrays.get("irises"), arrays.get("kps"), arrays.get("eva_kps"), arrays.get("regions"), is_target)

    def target_indices(self, names: set[str] | None = None) -> list[int]:
        """Images that may be drawn as targets (above the aesthetic threshold), of the people `names` (None: all)."""
        return [i for i, name in enumerate(self.identities)
                if (self.is_target is None or self.is_target[i]) and (names is None or str(name) in names)]

    def condition(self, index: int) -> np.ndarray:
        """The teacher's `blur_landmark_iris` condition of sample `index`."""
        return teacher_condition(self.images[index], self.landmarks[index], self.labels[index],
                                 self.irises[index] if self.irises is not None else None,
                                 region=self.regions[index] if self.regions is not None else None)

    def identity_image(self, index: int):
        """Sample `index` as the identity encoder sees it."""
        from training.loop import IdentityImage

        return IdentityImage(self.images[index], self.landmarks[index], self.embeddings[index], int(index),
                             self.kps[index] if self.kps is not None else None,
                             self.eva_kps[index] if self.eva_kps is not None else None)

    def by_identity(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for index, name in enumerate(self.identities):
            groups.setdefault(str(name), []).append(index)
        return groups

    def pairable(self) -> dict[str, list[int]]:
        """Identities with at least two images (a target and another image for the identity condition), one of
        them a target image."""
        groups = self.by_identity()
        single = sorted(name for name, idx in groups.items() if len(idx) < 2)
        if single:
            logger.warning("%d identities have a single image and cannot be paired: %s", len(single), ", ".join(single[:5]))
        targets = set(self.target_indices())
        usable = {name: idx for name, idx in groups.items() if len(idx) >= 2 and targets.intersection(idx)}
        if not usable:
            raise UserError("no identity has two or more images: the teacher needs pairs of the same person")
        return usable

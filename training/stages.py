"""The three APPLE stages: teacher (conditional deblurring), pseudo-labels (attribute-aware inversion), student."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from tqdm import tqdm

from apple_video.config import load_preset
from apple_video.errors import InputError, UserError
from apple_video.models.lora import load_lora
from apple_video.models.pipeline import ApplePipeline
from apple_video.settings import ModelOptions
from apple_video.swappers.presets import apple_files
from training.config import TrainConfig
from training.data import FaceData, open_shards, write_shard
from training.loop import Batch, IdentityImage, Trainer

logger = logging.getLogger(__name__)


def split_identities(names: list[str], fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """(training, held-out) identities: `fraction` of them (at least one) held out for the validation loss, drawn
    from the seed; none when `fraction` is 0 or fewer than two identities remain."""
    names = sorted(set(names))
    count = max(1, round(fraction * len(names))) if fraction > 0 else 0
    if count and len(names) - count < 1:
        logger.warning("validation off: %d identities leave none to train on", len(names))
        count = 0
    order = np.random.default_rng([seed, 4242]).permutation(len(names))
    held = {names[i] for i in order[:count]}
    return set(names) - held, held


class TeacherSampler:
    """Target = a clean image drawn uniformly from the data set's target images (identities with more images weigh
    more, as the official dataset); condition = its `blur_landmark_iris` version; id = an image of the same person
    drawn anew every step from ALL of that person's images (the aesthetic filter picks targets only), which may be
    the target itself (as the official dataset). `names`: the identities to draw from (None: all)."""

    def __init__(self, data: FaceData, names: set[str] | None = None) -> None:
        self.data = data
        self.groups = data.by_identity()
        self.targets = data.target_indices(names)
        if not self.targets:
            raise UserError("the prepared data set holds no target image (all below the aesthetic threshold?)")
        people = {str(data.identities[i]) for i in self.targets}
        single = sum(len(self.groups[name]) == 1 for name in people)
        if single:
            logger.warning("%d of %d identities have a single image: it is its own identity image", single, len(people))

    def batch(self, rng: np.random.Generator, size: int) -> Batch:
        targets, conditions, identity = [], [], []
        for _ in range(size):
            target = self.targets[int(rng.integers(len(self.targets)))]
            group = self.groups[str(self.data.identities[target])]
            source = int(group[rng.integers(len(group))])
            targets.append(self.data.images[target])
            conditions.append(self.data.condition(target))
            identity.append(self.data.identity_image(source))
        return Batch(np.stack(targets), np.stack(conditions), identity)


PSEUDO_KEYS = ("target", "pseudo", "src_image", "src_landmarks", "src_embedding")


class StudentSampler:
    """Target = the real image of A; condition = the teacher's pseudo-label A->B; id = another image of A.
    `names`: the identities A to draw from (None: all)."""

    def __init__(self, folder: Path, people: set[str] | None = None) -> None:
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            raise InputError(f"not a pseudo-label folder (no manifest.json): {folder}; run `apple-video train pseudo-labels`")
        names = json.loads(manifest.read_text())["shards"]
        if not names:
            raise InputError(f"no pseudo-labels in {folder}")
        self.arrays = open_shards(folder, names, PSEUDO_KEYS)
        optional = tuple(k for k in ("src_kps", "src_eva_kps") if all((folder / n / f"{k}.npy").is_file() for n in names))
        extra = open_shards(folder, names, optional)
        self.kps, self.eva_kps = extra.get("src_kps"), extra.get("src_eva_kps")
        self.identities = np.concatenate([np.load(folder / n / "identity.npy") for n in names])
        self.indices = [i for i, name in enumerate(self.identities) if people is None or str(name) in people]

    def batch(self, rng: np.random.Generator, size: int) -> Batch:
        a = self.arrays
        picks = [self.indices[i] for i in rng.integers(len(self.indices), size=size)]
        kps, eva = self.kps, self.eva_kps
        identity = [IdentityImage(a["src_image"][i], a["src_landmarks"][i], a["src_embedding"][i], 1_000_000 + int(i),
                                  kps[i] if kps is not None else None, eva[i] if eva is not None else None) for i in picks]
        return Batch(np.stack([a["target"][i] for i in picks]), np.stack([a["pseudo"][i] for i in picks]), identity)


def train_teacher(cfg: TrainConfig, stop_after: int | None = None) -> Trainer:
    data = FaceData.load(cfg.data)
    train, held = split_identities([str(n) for n in data.identities], cfg.val_fraction, cfg.seed)
    trainer = Trainer(cfg, TeacherSampler(data, train), TeacherSampler(data, held) if held else None)
    trainer.train(stop_after)
    return trainer


def train_student(cfg: TrainConfig, stop_after: int | None = None) -> Trainer:
    if cfg.init_lora is None:
        logger.warning("student without init_lora: the paper resumes the student from the teacher's LoRA")
    everyone = StudentSampler(cfg.data)
    train, held = split_identities([str(n) for n in everyone.identities], cfg.val_fraction, cfg.seed)
    trainer = Trainer(cfg, StudentSampler(cfg.data, train) if held else everyone,
                      StudentSampler(cfg.data, held) if held else None)
    trainer.train(stop_after)
    return trainer


def plan_pairs(data: FaceData, count: int, seed: int) -> list[tuple[int, int, int]]:
    """(target of A, another image of A, source of B != A), drawn with a fixed seed. Targets and B's source are
    target images (above the aesthetic threshold, as the official pairs); A's other image, the student's identity
    image, any image of A."""
    targets = set(data.target_indices())
    by_person = {name: [i for i in idx if i in targets] for name, idx in data.by_identity().items()}
    sources = sorted(name for name, idx in by_person.items() if idx)
    if len(data.by_identity()) < 2 or len(sources) < 1:
        raise UserError("pseudo-labels need at least two identities (a target A and a source B of someone else)")
    groups = data.pairable()
    names = sorted(groups)
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        a = rng.choice(names)
        target = rng.choice(by_person[a])
        src_a = rng.choice([i for i in groups[a] if i != target])
        others = [n for n in sources if n != a]
        if not others:
            raise UserError("pseudo-labels need a second identity with a target image as the source B")
        pairs.append((target, src_a, rng.choice(by_person[rng.choice(others)])))
    return pairs


def _eva_points(item: IdentityImage) -> np.ndarray:
    face = item.source_face()
    return face.eva_kps if face.eva_kps is not None else face.face.kps


def swap_in_batches(pipe: ApplePipeline, targets: np.ndarray, ids: torch.Tensor, nulls: torch.Tensor, seeds: list[int],
                    conditions: np.ndarray, batch_size: int) -> np.ndarray:
    """A shard's swaps, `batch_size` crops per model call (the pipeline's result does not depend on the batching)."""
    parts = [pipe.swap(targets[i : i + batch_size], ids[i : i + batch_size], nulls, seeds[i : i + batch_size],
                       conditions=conditions[i : i + batch_size]) for i in range(0, len(targets), batch_size)]
    return np.concatenate(parts)


def make_pseudo_labels(cfg: TrainConfig) -> Path:
    """Teacher swaps target A to identity B by attribute-aware inversion of the deblurred target -> triplet shards."""
    if cfg.teacher_lora is None:
        raise UserError("pseudo-labels need `teacher_lora` (the teacher's default.safetensors)")
    data = FaceData.load(cfg.data)
    pairs = plan_pairs(data, cfg.pairs, cfg.seed)
    state = PartialState(cpu=not torch.cuda.is_available())  # without `cpu`, CPU processes would not form a group
    preset = load_preset(cfg.preset)
    steps = {"inversion_steps": cfg.inversion_steps, "sampling_steps": cfg.inversion_steps} if cfg.inversion_steps else {}
    # pseudo-labels are the teacher's attribute-aware inversion, whatever the preset's swap recipe
    preset = preset.model_copy(update={"sampling": preset.sampling.model_copy(update={**steps, "recipe": "inversion"})})
    # the preset's own LoRA is loaded, then replaced by the teacher's
    pipe = ApplePipeline.from_preset(preset, state.device, files=apple_files(preset, ModelOptions()))
    load_lora(pipe.transformer, cfg.teacher_lora)
    out = cfg.output
    out.mkdir(parents=True, exist_ok=True)
    shards = [pairs[i : i + cfg.shard_size] for i in range(0, len(pairs), cfg.shard_size)]
    mine = [k for k in range(len(shards)) if k % state.num_processes == state.process_index]
    todo = [k for k in mine if not (out / f"pseudo_{k:05d}").exists()]
    logger.info("pseudo-labels: process %d of %d: %d of %d shards to make", state.process_index, state.num_processes,
                len(todo), len(shards))
    batch_size = pipe.auto_batch_size()  # as the engine sizes its model calls
    logger.info("pseudo-labels: %d crops per model call", batch_size)
    for k in tqdm(todo, desc="pseudo-labels", unit="shard", disable=None):
        chunk = shards[k]
        targets = np.stack([data.images[t] for t, _, _ in chunk])
        conditions = np.stack([data.condition(t) for t, _, _ in chunk])
        ids, nulls = [], None
        for _, _, b in chunk:
            tokens, nulls = pipe.id_embedding([data.identity_image(b).source_face()])
            ids.append(tokens[0])
        seeds = [cfg.seed + k * cfg.shard_size + i for i in range(len(chunk))]
        pseudo = swap_in_batches(pipe, targets, torch.stack(ids), nulls, seeds, conditions, batch_size)
        write_shard(out / f"pseudo_{k:05d}", {
            "target": targets, "pseudo": pseudo, "src_image": np.stack([data.images[s] for _, s, _ in chunk]),
            "src_landmarks": np.stack([data.landmarks[s] for _, s, _ in chunk]),
            "src_embedding": np.stack([data.embeddings[s] for _, s, _ in chunk]),
            "src_kps": np.stack([data.identity_image(s).source_face().face.kps for _, s, _ in chunk]).astype(np.float32),
            "src_eva_kps": np.stack([_eva_points(data.identity_image(s)) for _, s, _ in chunk]).astype(np.float32),
            "identity": np.array([str(data.identities[t]) for t, _, _ in chunk]),
            "source_identity": np.array([str(data.identities[b]) for _, _, b in chunk]),
        })
    state.wait_for_everyone()
    if state.is_main_process:
        done = sorted(p.name for p in out.glob("pseudo_*") if p.is_dir())
        (out / "manifest.json").write_text(json.dumps({"shards": done, "pairs": len(pairs), "teacher": str(cfg.teacher_lora)}))
    return out

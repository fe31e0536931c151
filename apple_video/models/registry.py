"""Every model file the tool can use: where it is looked for, how to get it, and whether it is present."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from apple_video.errors import WeightsError

Status = Literal["present", "missing", "corrupt"]


@dataclass(frozen=True)
class WeightFile:
    """One checkpoint file (or diffusers folder) the tool knows about."""

    name: str
    relpath: str  # under the weights home
    repo: str | None  # Hugging Face repo id to download from
    repo_file: str | None  # file inside that repo (None: whole snapshot)
    purpose: str
    min_bytes: int = 1
    sha256: str | None = None
    gated: bool = False
    is_dir: bool = False


REGISTRY: tuple[WeightFile, ...] = (
    WeightFile("flux-krea-dev", "FLUX.1-Krea-dev", "black-forest-labs/FLUX.1-Krea-dev", None,
               "diffusion backbone (transformer, VAE, text encoders)", gated=True, is_dir=True),
    WeightFile("apple-teacher", "apple/teacher/default.safetensors", "cvlab-kaist/APPLE", "checkpoints/teacher/default.safetensors",
               "APPLE teacher LoRA (rank 64, condition branch)", min_bytes=1_000_000),
    WeightFile("apple-student", "apple/student/default.safetensors", "cvlab-kaist/APPLE", "checkpoints/student/default.safetensors",
               "APPLE student LoRA (rank 64, condition branch)", min_bytes=1_000_000),
    WeightFile("pulid-flux-v0.9.1", "pulid/pulid_flux_v0.9.1.safetensors", "guozinan/PuLID", "pulid_flux_v0.9.1.safetensors",
               "PuLID-FLUX identity encoder + cross-attention", min_bytes=1_000_000),
    WeightFile("eva02-clip-l-336", "eva_clip/EVA02_CLIP_L_336_psz14_s6B.pt", "QuanSun/EVA-CLIP", "EVA02_CLIP_L_336_psz14_s6B.pt",
               "EVA02-CLIP-L-14-336 vision tower for PuLID", min_bytes=1_000_000),
    WeightFile("antelopev2-det", "insightface/models/antelopev2/scrfd_10g_bnkps.onnx", "DIAMONIK7777/antelopev2",
               "scrfd_10g_bnkps.onnx", "SCRFD face detector (insightface antelopev2)", min_bytes=1_000_000),
    WeightFile("antelopev2-arcface", "insightface/models/antelopev2/glintr100.onnx", "DIAMONIK7777/antelopev2",
               "glintr100.onnx", "ArcFace identity embedding (insightface antelopev2)", min_bytes=1_000_000),
    WeightFile("bisenet-parsing", "facexlib/parsing_bisenet.pth", None, None,
               "BiSeNet face parsing (facexlib release v0.2.0: parsing_bisenet.pth)", min_bytes=1_000_000),
    WeightFile("arcface-r50", "arcface/backbone_r50.pth", None, None,
               "insightface arcface_torch IResNet-50 (ms1mv3_arcface_r50_fp16/backbone.pth): differentiable identity loss",
               min_bytes=1_000_000),
)


def weights_home() -> Path:
    """`APPLE_VIDEO_HOME` or ~/.cache/apple-video."""
    return Path(os.environ.get("APPLE_VIDEO_HOME", Path.home() / ".cache" / "apple-video")).expanduser()


def lookup(name: str) -> WeightFile:
    for entry in REGISTRY:
        if entry.name == name:
            return entry
    known = ", ".join(e.name for e in REGISTRY)
    raise WeightsError(f"unknown model file '{name}' (known: {known})")


def candidates(entry: WeightFile) -> list[Path]:
    """Places searched in order: the weights home, then the Hugging Face cache snapshot."""
    paths = [weights_home() / entry.relpath]
    if entry.repo:
        hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
        repo_dir = hf_home / "hub" / f"models--{entry.repo.replace('/', '--')}" / "snapshots"
        if repo_dir.is_dir():
            for snapshot in sorted(repo_dir.iterdir()):
                paths.append(snapshot / entry.repo_file if entry.repo_file else snapshot)
    return paths


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_file(entry: WeightFile, path: Path, verify_hash: bool = False) -> Status:
    if entry.is_dir:
        return "present" if (path / "model_index.json").is_file() or (path / "transformer").is_dir() else "missing"
    if not path.is_file():
        return "missing"
    if path.stat().st_size < entry.min_bytes:
        return "corrupt"
    if verify_hash and entry.sha256 and _sha256(path) != entry.sha256:
        return "corrupt"
    return "present"


def status(entry: WeightFile) -> tuple[Status, Path]:
    """The best status over all candidate paths, and the path it refers to."""
    worst: tuple[Status, Path] = ("missing", candidates(entry)[0])
    for path in candidates(entry):
        state = check_file(entry, path)
        if state == "present":
            return state, path
        if state == "corrupt":
            worst = (state, path)
    return worst


def require(name: str) -> Path:
    """The path of a present model file, or a one-line WeightsError naming it and where it goes."""
    entry = lookup(name)
    state, path = status(entry)
    if state == "missing":
        raise WeightsError(f"model file missing: {entry.name} (expected at {candidates(entry)[0]})")
    if state == "corrupt":
        raise WeightsError(f"model file corrupt or truncated: {path}; delete it and download again")
    return path


def is_present(name: str) -> bool:
    return status(lookup(name))[0] == "present"

"""The weights catalogue: every model file the tool can use, where it is looked for, whether it is present, and
`apple-video weights download` (fetch from the Hugging Face hub, failing fast when offline)."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from apple_video.errors import UserError, WeightsError

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
    WeightFile("vgg16-lpips", "lpips/vgg16-397923af.pth", None, None,
               "torchvision VGG16 ImageNet weights (download.pytorch.org/models/vgg16-397923af.pth): LPIPS training loss",
               min_bytes=1_000_000),
    WeightFile("arcface-r50", "arcface/backbone_r50.pth", None, None,
               "insightface arcface_torch IResNet-50 (ms1mv3_arcface_r50_fp16/backbone.pth): differentiable identity loss",
               min_bytes=1_000_000),
    WeightFile("arcface-w600k", "insightface/models/buffalo_l/w600k_r50.onnx", None, None,
               "insightface buffalo_l ArcFace w600k_r50 (buffalo_l.zip of the insightface model zoo): identity metric of "
               "`eval`, not the antelopev2 model APPLE conditions on", min_bytes=1_000_000),
    WeightFile("fid-inception", "fid/pt_inception-2015-12-05-6726825d.pth", None, None,
               "FID Inception-v3 (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, its GitHub release fid_weights)",
               min_bytes=1_000_000),
    WeightFile("occlusion-deeplabv3", "apple/deeplabv3_iter_27600.pth", "cvlab-kaist/APPLE",
               "checkpoints/deeplabv3_iter_27600.pth",
               "APPLE occlusion DeepLabV3+ (GitHub cvlab-kaist/APPLE LFS at 23b30090549e88c38c2b6c47a3f2e38e2048f22a, "
               "501,455,936 bytes): --face-mask-types occlusion", min_bytes=1_000_000,
               sha256="d2448cef012f77534fa00f3c9ca7810e0998cdb52ad981b244388e73778781b5"),
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


logger = logging.getLogger(__name__)


def hub_reachable(timeout: float) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def download(names: list[str], timeout: float = 10.0) -> Iterator[str]:
    """Download each named file (all downloadable ones when `names` is empty) into the weights home."""
    entries = [lookup(n) for n in names] if names else [e for e in REGISTRY if e.repo]
    todo = [e for e in entries if status(e)[0] != "present"]
    if not todo:
        yield "all requested model files are present"
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable(timeout):
        raise UserError(f"cannot reach the Hugging Face hub within {timeout:.0f}s (offline?); copy the files by hand: "
                        "`apple-video weights where` lists where each one goes")
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    for entry in todo:
        if entry.repo is None:
            yield f"skipped {entry.name}: no hub source known ({entry.purpose})"
            continue
        target = weights_home() / entry.relpath
        try:
            if entry.is_dir:
                snapshot_download(entry.repo, local_dir=str(target))
            else:
                hf_hub_download(entry.repo, entry.repo_file, local_dir=str(target.parent / ".hub"))
                fetched = target.parent / ".hub" / entry.repo_file
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(fetched, target)
        except GatedRepoError:
            raise WeightsError(f"{entry.repo} is gated: accept its licence on huggingface.co and set HF_TOKEN") from None
        except HfHubHTTPError as error:
            raise WeightsError(f"download of {entry.name} failed: {error}") from None
        yield f"downloaded {entry.name} -> {target}"

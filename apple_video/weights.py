"""The weights catalogue: every model file the tool can use, where it comes from (with the published size and
sha256 where the source publishes them), where it is looked for, whether it is present, and
`apple-video weights download`: a resumable HTTP download (Range requests into a `.part` file, a tqdm bar)
checked against the pinned size and hash before it is renamed into place.

Sources, as each project publishes its files:
- `hf`: a Hugging Face model repo (`{HF_ENDPOINT}/{repo}/resolve/{revision}/{file}`); with no pinned hash the
  hub's own LFS sha256 (`X-Linked-Etag`) is checked and kept beside the file for `weights check --verify`;
- `hf-snapshot`: a diffusers folder of a repo, only the files the loader reads (`allow_patterns`);
- `github-lfs`: a git-LFS object of a GitHub repository at a pinned commit (media.githubusercontent.com);
- `url`: a release asset; `zip-member`: one file inside a release zip; `manual`: no direct link exists.
`APPLE_VIDEO_DOWNLOAD_BASE` replaces the scheme and host of every download URL (a mirror, or a test server).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import socket
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from apple_video.errors import UserError, WeightsError
from apple_video.media.paths import atomic_write

logger = logging.getLogger(__name__)

Status = Literal["present", "missing", "corrupt"]
SourceKind = Literal["hf", "hf-snapshot", "github-lfs", "url", "zip-member", "manual", "none"]

BASE_ENV = "APPLE_VIDEO_DOWNLOAD_BASE"
APPLE_REPO = "cvlab-kaist/APPLE"
APPLE_COMMIT = "23b30090549e88c38c2b6c47a3f2e38e2048f22a"
# what `load_transformer`, the VAE loader and the prompt encoder read of a diffusers FLUX repo: not the ~24 GB
# single-file checkpoint (flux1-krea-dev.safetensors) nor ae.safetensors beside the folders
FLUX_PATTERNS = ("model_index.json", "scheduler/*", "text_encoder/*", "text_encoder_2/*", "tokenizer/*",
                 "tokenizer_2/*", "transformer/*", "vae/*")
CHUNK = 1 << 20
RETRIES = 3


def github_lfs_url(repo: str, commit: str, path: str) -> str:
    """A git-LFS object's content at a commit (github.com/OWNER/REPO/raw/COMMIT/PATH redirects here)."""
    return f"https://media.githubusercontent.com/media/{repo}/{commit}/{path}"


@dataclass(frozen=True)
class WeightFile:
    """One checkpoint file (or diffusers folder) the tool knows about.

    The first five fields keep their order so simple entries construct positionally; the rest say where the
    file comes from and what it must be (`size` in bytes and `sha256` as published; `sha256_prefix` where only
    a file name's hash prefix is published, torch hub's convention; `hash_note` when nothing is)."""

    name: str
    relpath: str  # under the weights home
    repo: str | None = None  # Hugging Face repo id (source "hf" / "hf-snapshot")
    repo_file: str | None = None  # file inside that repo
    purpose: str = ""
    min_bytes: int = 1
    sha256: str | None = None
    gated: bool = False
    is_dir: bool = False
    source: SourceKind = "none"
    url: str | None = None  # direct URL (github-lfs, url, zip-member) or a page to fetch it from (manual)
    size: int | None = None
    sha256_prefix: str | None = None
    hash_note: str = ""
    member: str | None = None  # the file inside a zip (source "zip-member")
    revision: str = "main"
    allow_patterns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.source == "none" and self.repo is not None:  # older entries: a repo means the hub
            object.__setattr__(self, "source", "hf-snapshot" if self.is_dir else "hf")

    @property
    def smallest(self) -> int:
        return self.size if self.size is not None else self.min_bytes

    def describe_source(self) -> str:
        if self.source in ("hf", "hf-snapshot"):
            return f"hf://{self.repo}/{self.repo_file or ''}"
        if self.source == "zip-member":
            return f"{self.url} (member {self.member})"
        if self.source == "manual":
            return f"by hand from {self.url}"
        return self.url or "see description"


def _apple(name: str, path: str, relpath: str, purpose: str, size: int, sha256: str) -> WeightFile:
    return WeightFile(name, relpath, purpose=purpose, source="github-lfs", url=github_lfs_url(APPLE_REPO, APPLE_COMMIT, path),
                      size=size, sha256=sha256, min_bytes=size)


REGISTRY: tuple[WeightFile, ...] = (
    WeightFile("flux-krea-dev", "FLUX.1-Krea-dev", "black-forest-labs/FLUX.1-Krea-dev", None,
               "diffusion backbone (diffusers folders: transformer shards, VAE, both text encoders and tokenizers)",
               gated=True, is_dir=True, allow_patterns=FLUX_PATTERNS,
               hash_note="per-file sha256 from the hub's LFS pointers at download time"),
    _apple("apple-teacher", "checkpoints/teacher/default.safetensors", "apple/teacher/default.safetensors",
           "APPLE teacher LoRA (rank 64, condition branch)", 463_703_368,
           "63ae140f7c3dd262c895112d3989caf9788b164fcf3d416e8a896fefbce8937c"),
    _apple("apple-student", "checkpoints/student/default.safetensors", "apple/student/default.safetensors",
           "APPLE student LoRA (rank 64, condition branch)", 463_703_368,
           "7329225d329bb1b403f07be00a7bd1739d0e305ab719621cc2c1ecda950d8565"),
    _apple("apple-arcface", "checkpoints/arcface_checkpoint.tar", "apple/arcface_checkpoint.tar",
           "APPLE trainer's identity-loss ArcFace (netarc, a pickled model)", 209_280_521,
           "52ea5ce4902017b77a2bb811dd9a82f57dee3883e06c18a42d288437263c7a20"),
    _apple("occlusion-deeplabv3", "checkpoints/deeplabv3_iter_27600.pth", "apple/deeplabv3_iter_27600.pth",
           "APPLE preprocessing's occlusion model (mmseg DeepLabV3+, CelebAMask-HQ)", 501_455_936,
           "d2448cef012f77534fa00f3c9ca7810e0998cdb52ad981b244388e73778781b5"),
    WeightFile("pulid-flux-v0.9.1", "pulid/pulid_flux_v0.9.1.safetensors", "guozinan/PuLID", "pulid_flux_v0.9.1.safetensors",
               "PuLID-FLUX identity encoder + cross-attention", min_bytes=1_000_000,
               hash_note="sha256 from the hub's LFS pointer at download time"),
    WeightFile("eva02-clip-l-336", "eva_clip/EVA02_CLIP_L_336_psz14_s6B.pt", "QuanSun/EVA-CLIP", "EVA02_CLIP_L_336_psz14_s6B.pt",
               "EVA02-CLIP-L-14-336 vision tower for PuLID", min_bytes=1_000_000,
               hash_note="sha256 from the hub's LFS pointer at download time"),
    # PuLID's own code fetches antelopev2 from this repo (insightface no longer hosts the zip)
    WeightFile("antelopev2-det", "insightface/models/antelopev2/scrfd_10g_bnkps.onnx", "DIAMONIK7777/antelopev2",
               "scrfd_10g_bnkps.onnx", "SCRFD face detector (insightface antelopev2)", min_bytes=1_000_000,
               hash_note="sha256 from the hub's LFS pointer at download time"),
    WeightFile("antelopev2-arcface", "insightface/models/antelopev2/glintr100.onnx", "DIAMONIK7777/antelopev2",
               "glintr100.onnx", "ArcFace identity embedding (insightface antelopev2)", min_bytes=1_000_000,
               hash_note="sha256 from the hub's LFS pointer at download time"),
    WeightFile("bisenet-parsing", "facexlib/parsing_bisenet.pth", purpose="BiSeNet face parsing (facexlib release v0.2.0)",
               min_bytes=1_000_000, source="url",
               url="https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth",
               hash_note="facexlib publishes no size or hash for its release assets"),
    WeightFile("vgg16-lpips", "lpips/vgg16-397923af.pth",
               purpose="torchvision VGG16 ImageNet weights: LPIPS training loss", min_bytes=1_000_000, source="url",
               url="https://download.pytorch.org/models/vgg16-397923af.pth", sha256_prefix="397923af",
               hash_note="torchvision publishes only the sha256 prefix in the file name"),
    WeightFile("arcface-r50", "arcface/backbone_r50.pth",
               purpose="insightface arcface_torch IResNet-50 (ms1mv3_arcface_r50_fp16/backbone.pth): differentiable "
                       "identity loss", min_bytes=1_000_000, source="manual",
               url="https://github.com/deepinsight/insightface/tree/master/recognition/arcface_torch#model-zoo",
               hash_note="published only behind OneDrive/Baidu share links: no direct URL, size or hash"),
    WeightFile("arcface-w600k", "insightface/models/buffalo_l/w600k_r50.onnx",
               purpose="insightface buffalo_l ArcFace w600k_r50: identity metric of `eval`, not the antelopev2 model "
                       "APPLE conditions on", min_bytes=1_000_000, source="zip-member",
               url="https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip",
               member="w600k_r50.onnx", hash_note="insightface publishes no size or hash for its model zoo zips"),
    WeightFile("fid-inception", "fid/pt_inception-2015-12-05-6726825d.pth",
               purpose="FID Inception-v3 (pytorch-fid's release fid_weights)", min_bytes=1_000_000, source="url",
               url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
               sha256_prefix="6726825d", hash_note="pytorch-fid publishes only the sha256 prefix in the file name"),
    WeightFile("aesthetic-clip-l14", "aesthetic/clip-vit-large-patch14.safetensors", "openai/clip-vit-large-patch14",
               "model.safetensors", "CLIP ViT-L/14 image embedding of the LAION aesthetic filter (prepare-data "
               "--min-aesthetic; only the vision tower is read)", min_bytes=1_000_000,
               hash_note="sha256 from the hub's LFS pointer at download time"),
    WeightFile("aesthetic-mlp", "aesthetic/sac+logos+ava1-l14-linearMSE.pth",
               purpose="LAION aesthetic predictor MLP head (christophschuhmann/improved-aesthetic-predictor)",
               min_bytes=1_000_000, source="url",
               url="https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth",
               hash_note="the predictor's repository publishes no size or hash"),
    WeightFile("retinaface-resnet50", "facexlib/detection_Resnet50_Final.pth",
               purpose="facexlib RetinaFace ResNet-50: the 5 points PuLID aligns EVA-CLIP's input on (prepare-data)",
               min_bytes=1_000_000, source="url",
               url="https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth",
               hash_note="facexlib publishes no size or hash for its release assets"),
    # HopeNet as the paper's pose metric: the authors publish it only on Google Drive (README of
    # natanielruiz/deep-head-pose, file id 1m25PrSE7g9D2q2XJVMR6IA7RaCvWSzCR; no size or hash); the Hugging Face
    # mirror keeps the original pickle under orig/ (and a re-saved copy under models/)
    WeightFile("hopenet-robust-alpha1", "hopenet/hopenet_robust_alpha1.pkl", "public-data/Hopenet",
               "orig/hopenet_robust_alpha1.pkl",
               "HopeNet ResNet-50 head pose (natanielruiz/deep-head-pose, 300W-LP, alpha 1): `eval`'s pose metric, "
               "as the paper's", min_bytes=90_000_000,
               hash_note="the authors publish no size or hash (Google Drive); sha256 from the mirror's LFS pointer "
                         "at download time"),
    WeightFile("mediapipe-iris", "mediapipe/iris_landmark.tflite",
               purpose="MediaPipe iris landmarks (also in preprocess/MediaPipe_Iris/data/ of the official APPLE repo): "
                       "prepare-data's iris points with gaze, run by ai-edge-litert", min_bytes=1_000_000, source="url",
               url="https://storage.googleapis.com/mediapipe-assets/iris_landmark.tflite", size=2_640_568,
               sha256="d1744d2a09c25f501d39eba4faff47e53ecca8852c5ce19bce8eeac39357521f"),
)


# -- lookup and status ---------------------------------------------------------------------------------------------
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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(f"{path.name}.sha256")


def expected_sha256(entry: WeightFile, path: Path) -> str | None:
    """The pinned hash, else the one the hub gave at download time (kept beside the file)."""
    if entry.sha256:
        return entry.sha256
    side = _sidecar(path)
    return side.read_text().strip() if side.is_file() else None


def _hash_fits(entry: WeightFile, path: Path, digest: str) -> bool:
    wanted = expected_sha256(entry, path)
    if wanted and digest != wanted:
        return False
    return not (entry.sha256_prefix and not digest.startswith(entry.sha256_prefix))


def _folder_status(entry: WeightFile, path: Path, verify_hash: bool) -> Status:
    """A diffusers folder: its model_index.json, and every transformer shard its index json names."""
    if not (path / "model_index.json").is_file():
        return "present" if (path / "transformer").is_dir() and not verify_hash else "missing"
    index = path / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        if any(not (path / "transformer" / shard).is_file() for shard in shards):
            return "corrupt"
    if verify_hash:
        for file in path.rglob("*"):
            side = _sidecar(file)
            if file.is_file() and side.is_file() and sha256_of(file) != side.read_text().strip():
                return "corrupt"
    return "present"


def check_file(entry: WeightFile, path: Path, verify_hash: bool = False) -> Status:
    """present / missing / corrupt: the size first (the published one where known), the hash with `verify_hash`."""
    if entry.is_dir:
        return _folder_status(entry, path, verify_hash) if path.is_dir() else "missing"
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size < entry.min_bytes or (entry.size is not None and size != entry.size):
        return "corrupt"
    if verify_hash and not _hash_fits(entry, path, sha256_of(path)):
        return "corrupt"
    return "present"


def status(entry: WeightFile, verify_hash: bool = False) -> tuple[Status, Path]:
    """The best status over all candidate paths, and the path it refers to."""
    worst: tuple[Status, Path] = ("missing", candidates(entry)[0])
    for path in candidates(entry):
        state = check_file(entry, path, verify_hash)
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


@dataclass(frozen=True)
class ModelFiles:
    """Model files resolved once (by the planner) and passed down to the code that loads them: `files(name)`
    is the path; a name that was not resolved is a bug of the caller, not a missing file."""

    paths: tuple[tuple[str, Path], ...] = ()

    @classmethod
    def resolve(cls, names: Iterable[str]) -> ModelFiles:
        """Each named file checked (present, not truncated) once: a one-line WeightsError otherwise."""
        return cls(tuple((name, require(name)) for name in dict.fromkeys(names)))

    @classmethod
    def present(cls, names: Iterable[str]) -> ModelFiles:
        """Those of the named files that are present (the optional ones an `auto` choice uses when it can)."""
        found = ((name, status(lookup(name))) for name in dict.fromkeys(names))
        return cls(tuple((name, path) for name, (state, path) in found if state == "present"))

    def __call__(self, name: str) -> Path:
        path = self.get(name)
        if path is None:
            raise KeyError(f"model file {name} was not resolved by the planner")
        return path

    def get(self, name: str) -> Path | None:
        return next((path for known, path in self.paths if known == name), None)

    def __contains__(self, name: object) -> bool:
        return any(known == name for known, _ in self.paths)

    def __add__(self, other: ModelFiles) -> ModelFiles:
        """Both sets of files (a name in both keeps this one's path)."""
        return ModelFiles(self.paths + tuple((name, path) for name, path in other.paths if name not in self))


def is_present(name: str) -> bool:
    return status(lookup(name))[0] == "present"


# -- reading a checkpoint --------------------------------------------------------------------------------------------
Errors = type[BaseException] | tuple[type[BaseException], ...]


def error_name(error: BaseException) -> str:
    return error.__class__.__name__


@contextmanager
def refused_as(message: str, *, hint: str = "", errors: Errors = Exception,
               detail: Callable[[BaseException], str] = error_name) -> Iterator[None]:
    """An error of the block becomes one WeightsError, `message (detail)hint`: torch, safetensors and
    load_state_dict raise many types for a truncated or foreign file, none of them a user's sentence."""
    try:
        yield
    except errors as error:
        raise WeightsError(f"{message} ({detail(error)}){hint}") from None


def load_checkpoint(path: Path, unreadable: str, *, hint: str = "", errors: Errors = Exception,
                    detail: Callable[[BaseException], str] = error_name, weights_only: bool = True,
                    pickle_module: Any = None) -> Any:
    """A checkpoint's contents on the CPU (safetensors by the suffix, else torch.load); a file that does not read
    is one WeightsError `unreadable (ErrorType)hint` (see refused_as)."""
    with refused_as(unreadable, hint=hint, errors=errors, detail=detail):
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        import torch

        extra = {} if pickle_module is None else {"pickle_module": pickle_module}
        return torch.load(str(path), map_location="cpu", weights_only=weights_only, **extra)


# -- download ------------------------------------------------------------------------------------------------------
def _rebase(url: str) -> str:
    base = os.environ.get(BASE_ENV)
    if not base:
        return url
    parsed = urlparse(url)
    return base.rstrip("/") + parsed.path + (f"?{parsed.query}" if parsed.query else "")


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def download_url(entry: WeightFile) -> str:
    if entry.source == "hf":
        return _rebase(f"{hf_endpoint()}/{entry.repo}/resolve/{entry.revision}/{entry.repo_file}")
    if entry.url is None:
        raise WeightsError(f"{entry.name} has no download source")
    return _rebase(entry.url)


def hf_token() -> str | None:
    """HF_TOKEN, else the token `huggingface-cli login` stored."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except ImportError:
        return None


def gated_message(entry: WeightFile, code: int) -> str:
    where = f"https://huggingface.co/{entry.repo}" if entry.repo else entry.url
    return (f"{entry.name} is gated or needs a login (HTTP {code}): accept its licence at {where}, then pass a token "
            "with `export HF_TOKEN=hf_...` or `huggingface-cli login`")


def reachable(url: str, timeout: float) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201 (urllib's signature)
        return None


def hub_sha256(url: str, token: str | None, timeout: float) -> str | None:
    """The sha256 the hub publishes for an LFS file (`X-Linked-Etag` of the unredirected resolve answer)."""
    request = urllib.request.Request(url, method="HEAD")
    if token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        response = opener.open(request, timeout=timeout)
        headers = response.headers
    except urllib.error.HTTPError as error:  # the 302 to the CDN arrives as an "error" without redirects
        headers = error.headers
    except OSError:
        return None
    etag = (headers.get("X-Linked-Etag") or "").strip('"').removeprefix("W/").strip('"')
    return etag if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag) else None


def _open(url: str, start: int, token: str | None, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": "apple-video"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    if token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    return urllib.request.urlopen(request, timeout=timeout)


def _fetch_once(entry: WeightFile, url: str, part: Path, token: str | None, timeout: float) -> None:
    """Append to `part` from where it stops (Range); start over when the server ignores the range."""
    from tqdm import tqdm

    start = part.stat().st_size if part.is_file() else 0
    if entry.size is not None and start >= entry.size:
        return
    try:
        response = _open(url, start, token, timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and start:  # the part is already whole (or longer): let the checks decide
            return
        if error.code in (401, 403):
            raise WeightsError(gated_message(entry, error.code)) from None
        raise WeightsError(f"download of {entry.name} failed: HTTP {error.code} from {url}") from None
    with response:
        if start and response.status != 206:
            start = 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else entry.size
        with part.open("ab" if start else "wb") as out, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                                             desc=entry.name, leave=False) as bar:
            for block in iter(lambda: response.read(CHUNK), b""):
                out.write(block)
                bar.update(len(block))
        if length is not None and part.stat().st_size < total:
            raise http.client.IncompleteRead(b"", total - part.stat().st_size)


def fetch(entry: WeightFile, target: Path, timeout: float = 30.0, retries: int = RETRIES) -> Path:
    """Download `entry` to `target` through `target.part` (kept across cut connections and reruns), check its
    size and sha256, then rename it into place."""
    url = download_url(entry)
    token = hf_token() if entry.source == "hf" else None
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f"{target.name}.part")
    for attempt in range(retries + 1):
        try:
            _fetch_once(entry, url, part, token, timeout)
            break
        except (OSError, http.client.HTTPException) as error:
            if attempt == retries:
                raise WeightsError(f"download of {entry.name} kept failing ({error.__class__.__name__}); run the "
                                   f"command again to resume from {part.stat().st_size if part.is_file() else 0} bytes"
                                   ) from None
            logger.warning("%s: connection lost (%s), resuming", entry.name, error.__class__.__name__)
    _accept(entry, part, url, token, timeout)
    os.replace(part, target)
    return target


def _accept(entry: WeightFile, part: Path, url: str, token: str | None, timeout: float) -> None:
    size = part.stat().st_size
    if entry.size is not None and size != entry.size:
        part.unlink()
        raise WeightsError(f"{entry.name}: got {size} bytes, the source publishes {entry.size}; refused")
    wanted = entry.sha256 or (hub_sha256(url, token, timeout) if entry.source == "hf" else None)
    digest = sha256_of(part)
    if (wanted and digest != wanted) or (entry.sha256_prefix and not digest.startswith(entry.sha256_prefix)):
        part.unlink()
        raise WeightsError(f"{entry.name}: sha256 {digest[:12]}... is not the published "
                           f"{(wanted or entry.sha256_prefix or '')[:12]}...; refused")
    if wanted and not entry.sha256:
        _sidecar(part.with_name(part.name.removesuffix(".part"))).write_text(wanted + "\n")


def _fetch_zip_member(entry: WeightFile, target: Path, timeout: float) -> Path:
    archive = target.with_name(Path(urlparse(entry.url or "").path).name)
    fetch(WeightFile(f"{entry.name} (zip)", "", source="url", url=entry.url), archive, timeout)
    with zipfile.ZipFile(archive) as handle:
        names = [n for n in handle.namelist() if Path(n).name == entry.member]
        if not names:
            raise WeightsError(f"{archive.name} has no {entry.member}")
        with atomic_write(target) as tmp, handle.open(names[0]) as src, tmp.open("wb") as out:
            for block in iter(lambda: src.read(CHUNK), b""):
                out.write(block)
    archive.unlink()
    return target


def _fetch_snapshot(entry: WeightFile, target: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    try:
        snapshot_download(entry.repo, revision=entry.revision, local_dir=str(target),
                          allow_patterns=list(entry.allow_patterns) or None, token=hf_token())
    except GatedRepoError:
        raise WeightsError(gated_message(entry, 401)) from None
    except HfHubHTTPError as error:
        code = getattr(error.response, "status_code", None)
        if code in (401, 403):
            raise WeightsError(gated_message(entry, code)) from None
        raise WeightsError(f"download of {entry.name} failed: {str(error).splitlines()[0]}") from None
    return target


def snapshot_files(entry: WeightFile, repo_files: list[str]) -> list[str]:
    """Which of a repo's files a snapshot fetches (huggingface_hub's own filter)."""
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(repo_files, allow_patterns=list(entry.allow_patterns) or None))


def download(names: list[str], timeout: float = 10.0) -> Iterator[str]:
    """Download each named file (every one with a direct source when `names` is empty) into the weights home."""
    entries = [lookup(n) for n in names] if names else [e for e in REGISTRY if e.source not in ("manual", "none")]
    todo = [e for e in entries if status(e)[0] != "present"]
    if not todo:
        yield "all requested model files are present"
        return
    for entry in todo:
        if entry.source in ("manual", "none"):
            yield f"skipped {entry.name}: no direct download; get it {entry.describe_source()} -> {candidates(entry)[0]}"
            continue
        url = _rebase(f"{hf_endpoint()}/") if entry.source == "hf-snapshot" else download_url(entry)
        offline = entry.source == "hf-snapshot" and os.environ.get("HF_HUB_OFFLINE") == "1"
        if offline or not reachable(url, timeout):
            raise UserError(f"cannot reach {urlparse(url).netloc} within {timeout:.0f}s (offline?); copy the files "
                            "by hand: `apple-video weights where` lists where each one goes")
        target = weights_home() / entry.relpath
        if entry.source == "hf-snapshot":
            _fetch_snapshot(entry, target)
        elif entry.source == "zip-member":
            _fetch_zip_member(entry, target, timeout * 3)
        else:
            fetch(entry, target, timeout * 3)
        yield f"downloaded {entry.name} -> {target}"

"""FID: Frechet distance between Inception-v3 pool features (2048-D) of swapped images and a reference set.

The network is torchvision's Inception3 with the TensorFlow graph's differences (average pools that ignore
padding, a max pool in the last block, 1008 classes), the variant whose ported weights pytorch-fid publishes,
so the numbers are comparable to pytorch-fid's and the paper's protocol (REFace's fid_score.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

from apple_video.errors import InputError
from apple_video.media.images import is_image_path, read_image

FID_MODEL = "Inception-v3 pool3 2048-D (pytorch-fid's TF-ported weights pt_inception-2015-12-05)"


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's 3x3 average pool divides by the number of real (unpadded) pixels."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _BlockA(InceptionA):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))]


class _BlockC(InceptionC):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return [self.branch1x1(x), b7, d, self.branch_pool(_tf_avg_pool(x))]


class _BlockE(InceptionE):
    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__(in_channels)
        self.max_pool = max_pool  # the TF graph's last block pools with max, not average

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return [self.branch1x1(x), b3, d, self.branch_pool(pooled)]


class FIDInception(Inception3):
    """Inception-v3 returning the 2048-D pool features of images in [0, 1] (any size; resized to 299)."""

    def __init__(self) -> None:
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False)
        self.Mixed_5b = _BlockA(192, pool_features=32)
        self.Mixed_5c = _BlockA(256, pool_features=64)
        self.Mixed_5d = _BlockA(288, pool_features=64)
        self.Mixed_6b = _BlockC(768, channels_7x7=128)
        self.Mixed_6c = _BlockC(768, channels_7x7=160)
        self.Mixed_6d = _BlockC(768, channels_7x7=160)
        self.Mixed_6e = _BlockC(768, channels_7x7=192)
        self.Mixed_7b = _BlockE(1280, max_pool=False)
        self.Mixed_7c = _BlockE(2048, max_pool=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        stem: list[nn.Module] = [self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.maxpool1,
                                 self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.maxpool2]
        blocks = [self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                  self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c]
        for layer in stem + blocks:
            x = layer(x)
        return self.avgpool(x).flatten(1)


FID_WEIGHTS = "fid-inception"


def load_fid_inception(path: Path, device: str = "cpu") -> FIDInception:
    """The network with its weights from the catalogue's file `fid-inception` (as the eval's planner resolved it)."""
    model = FIDInception()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval().to(device)


def _as_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div(255)


@torch.inference_mode()
def activations(model: FIDInception, images: Iterable[np.ndarray], batch: int = 16) -> np.ndarray:
    """Pool features of RGB uint8 images, each resized to 299 (bilinear) as pytorch-fid does."""
    device = next(model.parameters()).device
    feats, group = [], []

    def flush() -> None:
        x = torch.cat([F.interpolate(t[None], size=(299, 299), mode="bilinear", align_corners=False) for t in group])
        feats.append(model(x.to(device)).double().cpu().numpy())
        group.clear()

    for rgb in images:
        group.append(_as_tensor(rgb))
        if len(group) == batch:
            flush()
    if group:
        flush()
    return np.concatenate(feats) if feats else np.zeros((0, 2048))


def _trace_sqrt_product(a: np.ndarray, b: np.ndarray) -> float:
    """Tr((S_a S_b)^1/2) of the two samples' covariances, exactly, without a general matrix square root.

    Few samples (n <= dims): the covariances are Xa'Xa/(na-1) and Xb'Xb/(nb-1) with centred rows, and the
    non-zero eigenvalues of their product are the squared singular values of Xa Xb' / sqrt((na-1)(nb-1)).
    Many samples: S_a^1/2 from a symmetric eigendecomposition, then the eigenvalues of S_a^1/2 S_b S_a^1/2."""
    xa, xb = a - a.mean(0), b - b.mean(0)
    scale = math.sqrt((len(a) - 1) * (len(b) - 1))
    if max(len(a), len(b)) <= a.shape[1]:
        return float(np.linalg.svd(xa @ xb.T / scale, compute_uv=False).sum())
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(np.sqrt(np.clip(inner, 0, None)).sum())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^1/2) of two feature sets (rows are samples)."""
    if len(a) < 2 or len(b) < 2:
        raise InputError("FID needs at least 2 images on each side")
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    trace_a = float(np.sum(np.var(a, axis=0, ddof=1)))
    trace_b = float(np.sum(np.var(b, axis=0, ddof=1)))
    mean_term = float(np.sum((a.mean(0) - b.mean(0)) ** 2))
    return mean_term + trace_a + trace_b - 2 * _trace_sqrt_product(a, b)


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputError(f"FID reference folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_path(p))
    if len(files) < 2:
        raise InputError(f"FID reference folder holds fewer than 2 images: {folder}")
    return files


def read_images(paths: Iterable[Path]) -> Iterator[np.ndarray]:
    for path in paths:
        yield read_image(path).rgb


def fid(model: FIDInception, generated: list[Path], reference: list[Path], batch: int = 16) -> float:
    return frechet_distance(activations(model, read_images(generated), batch),
                            activations(model, read_images(reference), batch))

"""Identity features for PuLID's IDFormer: an ArcFace-style embedding plus EVA-CLIP CLS and 5 hidden states.

Real: insightface antelopev2 ArcFace (glintr100, 512-d) + EVA02-CLIP-L-14-336 (timm `Eva`, 768-d CLS,
hidden states entering blocks 4, 8, 12, 16, 20). The EVA input is PuLID's: the face aligned by facexlib's rule,
grey, on white where BiSeNet parsing says background (hair kept) -- the same function at swap and training time.
Tiny: dlib's 128-d embedding + a tiny random `Eva` of the same class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from timm.models.eva import Eva

from apple_video.faces.align import similarity_from_points, template, transform_points
from apple_video.faces.mask import hull_mask, oval_mask
from apple_video.faces.parsing import FaceParser
from apple_video.faces.types import SourceFace

logger = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PULID_SIZE = 512
BORDER_GREY = (135, 133, 132)  # facexlib's border colour
PULID_BACKGROUND_LABELS = (0, 16, 18, 7, 8, 9, 14, 15)  # background, cloth, hat, ears, earring, neck, necklace


@dataclass
class IdentityFeatures:
    id_cond: torch.Tensor  # (1, id_dim)
    vit_hidden: list[torch.Tensor]  # 5 x (1, n_tokens, vit_dim)


class IdentityFeatureExtractor(Protocol):
    def __call__(self, source: SourceFace) -> IdentityFeatures: ...


def eva_features(model: Eva, pixels: torch.Tensor, stride: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """CLS embedding (after norm and head) and the hidden states entering blocks stride, 2*stride, ... 5*stride."""
    x = model.patch_embed(pixels)
    x, rope = model._pos_embed(x)
    x = model.norm_pre(x)
    hidden = []
    for index, block in enumerate(model.blocks):
        if 0 < index <= 5 * stride and index % stride == 0:
            hidden.append(x)
        x = block(x, rope=rope)
    cls = model.head(model.fc_norm(model.norm(x)[:, 0]) if hasattr(model, "fc_norm") else model.norm(x)[:, 0])
    return cls, hidden


def pulid_align(image: np.ndarray, kps: np.ndarray, size: int = PULID_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """facexlib's FaceRestoreHelper alignment as PuLID uses it: a 5-point partial affine (LMEDS) onto the FFHQ
    template, grey constant border. Returns (crop, 2x3 matrix)."""
    kps = np.asarray(kps, np.float64)
    matrix = cv2.estimateAffinePartial2D(kps, template(size), method=cv2.LMEDS)[0]
    if matrix is None:  # degenerate points: the least-squares similarity instead
        matrix = similarity_from_points(kps, template(size))
    crop = cv2.warpAffine(image, matrix, (size, size), borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_GREY)
    return crop, matrix


def identity_background(aligned: np.ndarray, parser: FaceParser | None, landmarks: np.ndarray | None) -> np.ndarray:
    """Where PuLID paints white: BiSeNet's background, cloth, hat, ears, earrings and neck (hair and glasses stay).
    Without parsing weights: outside the 68-landmark hull (or a template oval)."""
    size = aligned.shape[0]
    if parser is not None:
        return np.isin(parser.labels(aligned), PULID_BACKGROUND_LABELS)
    mask = hull_mask(landmarks, size) if landmarks is not None and len(landmarks) == 68 else oval_mask(size)
    return mask == 0


def pulid_face_image(source: SourceFace, parser: FaceParser | None) -> torch.Tensor:
    """PuLID's EVA-CLIP input before resizing: (1, 3, 512, 512) in [0, 1], the aligned face in grey
    (0.299 R + 0.587 G + 0.114 B) on white where parsing says background."""
    aligned, matrix = pulid_align(source.image, source.eva_kps if source.eva_kps is not None else source.face.kps)
    landmarks = transform_points(source.face.landmarks, matrix) if source.face.landmarks is not None else None
    background = torch.from_numpy(identity_background(aligned, parser, landmarks))[None, None]
    rgb = torch.from_numpy(np.ascontiguousarray(aligned)).permute(2, 0, 1)[None].float() / 255.0
    grey = (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]).repeat(1, 3, 1, 1)
    return torch.where(background, torch.ones_like(grey), grey)


def eva_input(source: SourceFace, parser: FaceParser | None, image_size: int) -> torch.Tensor:
    """The normalised EVA-CLIP input: PuLID's grey face, bicubic-resized (antialiased, as torchvision >= 0.17 resizes
    tensors: APPLE's environment)."""
    image = pulid_face_image(source, parser)
    image = F.interpolate(image, size=(image_size, image_size), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(OPENAI_MEAN)[None, :, None, None]
    std = torch.tensor(OPENAI_STD)[None, :, None, None]
    return (image - mean) / std


def announce_parser(parser: FaceParser | None) -> None:
    if parser is None:
        logger.warning("identity input: no BiSeNet parsing weights, so the face is cut out with the landmark hull "
                       "(PuLID keeps the hair; see `apple-video weights where`)")


class TinyIdentity:
    """dlib 128-d embedding (real, offline) + a tiny random EVA: the real code path at test scale."""

    def __init__(self, seed: int, embed_dim: int = 32, image_size: int = 56, parser: FaceParser | None = None) -> None:
        self.parser = parser
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed + 1)
        self.eva = Eva(img_size=image_size, patch_size=14, embed_dim=embed_dim, depth=6, num_heads=2, num_classes=embed_dim,
                       global_pool="token").eval()
        torch.random.set_rng_state(generator_state)
        self.image_size = image_size
        self.id_dim = 128 + embed_dim
        self.vit_dim = embed_dim

    @torch.no_grad()
    def __call__(self, source: SourceFace) -> IdentityFeatures:
        arc = torch.as_tensor(source.face.embedding if source.face.embedding is not None else np.zeros(128),
                              dtype=torch.float32)[None]
        pixels = eva_input(source, self.parser, self.image_size)
        cls, hidden = eva_features(self.eva, pixels, stride=1)
        cls = torch.nn.functional.normalize(cls, dim=-1)
        return IdentityFeatures(torch.cat([arc, cls], dim=-1), hidden)

"""Face occlusion masks: the DeepLabV3+ network of the official APPLE preprocessing (mmsegmentation's EncoderDecoder
with a ResNetV1c-101 backbone and a DepthwiseSeparableASPPHead, 2 classes: 1 = face visible), written in plain
torch with mmseg's module names so that `checkpoints/deeplabv3_iter_27600.pth` loads as is.

What covers a target face (a hand, a microphone, a glasses frame) is class 0: the paste keeps the target there."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from apple_video import weights
from apple_video.errors import WeightsError

if TYPE_CHECKING:  # torch loads only when occlusion masks are asked for
    import torch

logger = logging.getLogger(__name__)

OCCLUSION_WEIGHTS = "occlusion-deeplabv3"
OCCLUSION_SIZE = 512  # the official test pipeline's scale
MEAN = (123.675, 116.28, 103.53)  # mmseg's img_norm_cfg (RGB)
STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class OcclusionConfig:
    """The network's shape. Defaults: the official file (ResNetV1c-101, ASPP at 512 channels)."""

    blocks: tuple[int, int, int, int] = (3, 4, 23, 3)
    stem_channels: int = 64
    base_channels: int = 64
    channels: int = 512
    c1_channels: int = 48
    dilations: tuple[int, ...] = (1, 12, 24, 36)
    num_classes: int = 2


def _build(config: OcclusionConfig):
    """The module tree (built in a function so that torch is imported only here)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class ConvModule(nn.Module):
        """mmcv ConvModule: conv (no bias) + BN + ReLU, keys `conv.*` and `bn.*`."""

        def __init__(self, cin: int, cout: int, kernel: int, padding: int = 0, dilation: int = 1,
                     groups: int = 1) -> None:
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, groups=groups, bias=False)
            self.bn = nn.BatchNorm2d(cout)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.bn(self.conv(x)))

    class SeparableConv(nn.Module):
        """mmcv DepthwiseSeparableConvModule: depthwise ConvModule then pointwise ConvModule."""

        def __init__(self, cin: int, cout: int, padding: int, dilation: int = 1) -> None:
            super().__init__()
            self.depthwise_conv = ConvModule(cin, cin, 3, padding=padding, dilation=dilation, groups=cin)
            self.pointwise_conv = ConvModule(cin, cout, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pointwise_conv(self.depthwise_conv(x))

    class Bottleneck(nn.Module):
        """mmseg ResNet Bottleneck, 'pytorch' style (the stride on the 3x3 conv)."""

        expansion = 4

        def __init__(self, cin: int, planes: int, stride: int, dilation: int) -> None:
            super().__init__()
            cout = planes * self.expansion
            self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = F.relu(self.bn1(self.conv1(x)))
            out = F.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return F.relu(out + (x if self.downsample is None else self.downsample(x)))

    class ResNetV1c(nn.Module):
        """Deep stem (three 3x3 convs), strides (1, 2, 1, 1), dilations (1, 1, 2, 4) contracted in each stage's
        first block: output stride 8, as the official config."""

        def __init__(self) -> None:
            super().__init__()
            half = config.stem_channels // 2
            self.stem = nn.Sequential(
                nn.Conv2d(3, half, 3, 2, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
                nn.Conv2d(half, half, 3, 1, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
                nn.Conv2d(half, config.stem_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(config.stem_channels),
                nn.ReLU())
            cin = config.stem_channels
            for stage, (count, stride, dilation) in enumerate(zip(config.blocks, (1, 2, 1, 1), (1, 1, 2, 4),
                                                                  strict=True)):
                planes = config.base_channels * 2**stage
                first = dilation // 2 if dilation > 1 else dilation
                blocks = [Bottleneck(cin, planes, stride, first)]
                cin = planes * Bottleneck.expansion
                blocks += [Bottleneck(cin, planes, 1, dilation) for _ in range(count - 1)]
                setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            x = F.max_pool2d(self.stem(x), 3, 2, 1)
            outs = []
            for stage in range(4):
                x = getattr(self, f"layer{stage + 1}")(x)
                outs.append(x)
            return outs

    class DepthwiseSeparableASPPHead(nn.Module):
        """DeepLabV3+ decoder: image pooling + ASPP (separable atrous convs) on the last stage, fused with the
        first stage's features at 1/4 resolution."""

        def __init__(self) -> None:
            super().__init__()
            cin, ch = config.base_channels * 8 * Bottleneck.expansion, config.channels
            c1_in = config.base_channels * Bottleneck.expansion
            self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(cin, ch, 1))
            self.aspp_modules = nn.ModuleList(
                [ConvModule(cin, ch, 1) if d == 1 else SeparableConv(cin, ch, padding=d, dilation=d)
                 for d in config.dilations])
            self.bottleneck = ConvModule((len(config.dilations) + 1) * ch, ch, 3, padding=1)
            self.c1_bottleneck = ConvModule(c1_in, config.c1_channels, 1)
            self.sep_bottleneck = nn.Sequential(SeparableConv(ch + config.c1_channels, ch, padding=1),
                                                SeparableConv(ch, ch, padding=1))
            self.conv_seg = nn.Conv2d(ch, config.num_classes, 1)

        def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
            x = features[3]
            pooled = F.interpolate(self.image_pool(x), size=x.shape[2:], mode="bilinear", align_corners=False)
            out = self.bottleneck(torch.cat([pooled, *(m(x) for m in self.aspp_modules)], dim=1))
            c1 = self.c1_bottleneck(features[0])
            out = F.interpolate(out, size=c1.shape[2:], mode="bilinear", align_corners=False)
            return self.conv_seg(self.sep_bottleneck(torch.cat([out, c1], dim=1)))

    class OcclusionNet(nn.Module):
        """mmseg EncoderDecoder (the auxiliary FCN head is for training only and is not built)."""

        def __init__(self) -> None:
            super().__init__()
            self.config = config
            self.backbone = ResNetV1c()
            self.decode_head = DepthwiseSeparableASPPHead()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """(B, 3, H, W) normalised RGB -> (B, num_classes, H, W) logits."""
            logits = self.decode_head(self.backbone(x))
            return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)

    return OcclusionNet()


def build_occlusion_net(config: OcclusionConfig = OcclusionConfig(), seed: int | None = None):
    """The network with random weights (seeded when `seed` is given), in eval mode."""
    import torch

    state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        return _build(config).eval()
    finally:
        torch.random.set_rng_state(state)


def config_from_state(state: dict) -> OcclusionConfig:
    """The shape of the network a state dict was saved from (the official file or a smaller stand-in)."""
    b1, b2, b3, b4 = (len({k.split(".")[2] for k in state if k.startswith(f"backbone.layer{i}.")}) for i in range(1, 5))
    # the atrous rates leave no trace in the weights: the official ones, as many as there are ASPP branches
    count = len({k.split(".")[2] for k in state if k.startswith("decode_head.aspp_modules.")})
    dilations = OcclusionConfig().dilations[:count]
    return OcclusionConfig(
        blocks=(b1, b2, b3, b4),
        stem_channels=int(state["backbone.stem.6.weight"].shape[0]),
        base_channels=int(state["backbone.layer1.0.conv1.weight"].shape[0]),
        channels=int(state["decode_head.conv_seg.weight"].shape[1]),
        c1_channels=int(state["decode_head.c1_bottleneck.conv.weight"].shape[0]),
        dilations=tuple(dilations),
        num_classes=int(state["decode_head.conv_seg.weight"].shape[0]),
    )


def _read_checkpoint(path) -> dict:
    """The state dict of an mmseg checkpoint ({'meta', 'state_dict', 'optimizer'}) or of a bare state dict. Tensors
    only (weights_only); should a file's meta hold other objects, it is unpickled in full only when its sha256 is
    the catalogue's."""
    unreadable = {"unreadable": f"{path} is not a readable checkpoint", "hint": "; delete it and download again",
                  "errors": (RuntimeError, OSError, EOFError)}
    try:
        checkpoint = weights.load_checkpoint(path, **unreadable)
    except pickle.UnpicklingError:
        if weights.check_file(weights.lookup(OCCLUSION_WEIGHTS), path, verify_hash=True) != "present":
            raise WeightsError(f"{path} holds more than tensors and is not the catalogued "
                               "deeplabv3_iter_27600.pth (sha256 differs)") from None
        checkpoint = weights.load_checkpoint(path, **unreadable, weights_only=False)
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{path} is not an mmsegmentation checkpoint")
    state = checkpoint.get("state_dict", checkpoint)
    return {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("auxiliary_head.")}


def load_occlusion_net(path=None, device: str = "cpu"):
    """The occlusion network from the catalogue's file (or `path`), its shape read from the file."""
    path = weights.require(OCCLUSION_WEIGHTS) if path is None else Path(path)
    state = _read_checkpoint(path)
    with weights.refused_as(f"{path} is not the APPLE DeepLabV3+ occlusion checkpoint",
                            errors=(KeyError, RuntimeError, ValueError)):
        model = build_occlusion_net(config_from_state(state))
        model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def occlusion_mask(model, rgb: np.ndarray) -> np.ndarray:
    """float32 (H, W) mask of an RGB uint8 face crop: 1 where the face is visible, 0 where something covers it
    (and off the face). The crop is resized to 512 as the official test pipeline does."""
    import torch

    h, w = rgb.shape[:2]
    image = cv2.resize(np.ascontiguousarray(rgb[..., :3]), (OCCLUSION_SIZE, OCCLUSION_SIZE),
                       interpolation=cv2.INTER_AREA if max(h, w) > OCCLUSION_SIZE else cv2.INTER_LINEAR)
    normalised = (image.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
    device = next(model.parameters()).device
    tensor = torch.from_numpy(normalised).permute(2, 0, 1)[None].to(device)
    with torch.no_grad():
        logits = model(tensor)[0].float()
    visible = (logits[1] > logits[0]).cpu().numpy().astype(np.float32)
    return cv2.resize(visible, (w, h), interpolation=cv2.INTER_LINEAR).round().astype(np.float32)


class OcclusionMasker:
    """The network and where it runs, for one job; masks per crop."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        return occlusion_mask(self.model, crop)


def create_occlusion(wanted: bool, device: str = "auto") -> OcclusionMasker | None:
    """The occlusion masker when `wanted` and its file is present; else None, with one line saying it is off.
    `device` auto: CUDA when there is one."""
    if not wanted:
        return None
    if not weights.is_present(OCCLUSION_WEIGHTS):
        logger.info("occlusion masks off: %s not found (%s); see `apple-video weights where`", OCCLUSION_WEIGHTS,
                    weights.lookup(OCCLUSION_WEIGHTS).relpath)
        return None
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return OcclusionMasker(load_occlusion_net(device=device))

"""The DeepLabV3+ occlusion network in plain torch with mmseg's module names (see faces/occlusion.py, which
imports this module only when occlusion masks are asked for: torch loads here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F


class OcclusionConfig(Protocol):
    """The network's shape (`faces.occlusion.OcclusionConfig`, which holds the official defaults)."""

    blocks: tuple[int, int, int, int]
    stem_channels: int
    base_channels: int
    channels: int
    c1_channels: int
    dilations: tuple[int, ...]
    num_classes: int


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

    def __init__(self, config: OcclusionConfig) -> None:
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

    def __init__(self, config: OcclusionConfig) -> None:
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

    def __init__(self, config: OcclusionConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = ResNetV1c(config)
        self.decode_head = DepthwiseSeparableASPPHead(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised RGB -> (B, num_classes, H, W) logits."""
        logits = self.decode_head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)

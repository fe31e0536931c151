"""A differentiable ArcFace (IResNet, insightface `arcface_torch` key names) for identity losses and evaluation.

`iresnet50`/`iresnet100` load insightface's arcface_torch checkpoints (`backbone.pth`); `tiny_iresnet` is the
same class with small random weights for tests. Input: RGB in [-1, 1], 112x112. Output: 512-d (not normalised).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from apple_video.errors import WeightsError


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (self.downsample(x) if self.downsample is not None else x)


class IResNet(nn.Module):
    def __init__(self, layers: tuple[int, int, int, int], widths: tuple[int, int, int, int] = (64, 128, 256, 512),
                 num_features: int = 512, input_size: int = 112) -> None:
        super().__init__()
        self.input_size = input_size
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-05)
        self.prelu = nn.PReLU(widths[0])
        inplanes = widths[0]
        for index, (count, width) in enumerate(zip(layers, widths, strict=True), start=1):
            blocks = []
            for b in range(count):
                downsample = None
                if b == 0:
                    downsample = nn.Sequential(nn.Conv2d(inplanes, width, 1, 2, bias=False), nn.BatchNorm2d(width, eps=1e-05))
                blocks.append(IBasicBlock(inplanes, width, 2 if b == 0 else 1, downsample))
                inplanes = width
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
        self.bn2 = nn.BatchNorm2d(widths[-1], eps=1e-05)
        self.dropout = nn.Dropout(p=0.0)
        spatial = input_size // 16
        self.fc = nn.Linear(widths[-1] * spatial * spatial, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet50() -> IResNet:
    return IResNet((3, 4, 14, 3))


def iresnet100() -> IResNet:
    return IResNet((3, 13, 30, 3))


def tiny_iresnet(seed: int = 0) -> IResNet:
    torch.manual_seed(seed)
    return IResNet((1, 1, 1, 1), widths=(8, 8, 16, 16), num_features=32, input_size=32).eval()


def load_arcface(path: Path, arch: str = "iresnet50") -> IResNet:
    model = {"iresnet50": iresnet50, "iresnet100": iresnet100}[arch]()
    if not path.is_file():
        raise WeightsError(f"ArcFace checkpoint missing: {path}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # several types for truncated or foreign files
        raise WeightsError(f"ArcFace checkpoint unreadable: {path} ({error.__class__.__name__})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise WeightsError(f"{path} is not an arcface_torch {arch} checkpoint ({len(missing)} missing keys)")
    return model.eval()


def identity_loss(model: IResNet, generated: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Per-sample 1 - cos(F(generated), F(source)); images in [-1, 1], (B, 3, H, W)."""
    a = F.normalize(model(generated), dim=-1)
    with torch.no_grad():
        b = F.normalize(model(source), dim=-1)
    return 1 - (a * b).sum(-1)

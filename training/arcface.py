"""The identity-loss networks of training: the official trainer's SimSwap-style `netarc` and insightface's arcface_torch.

`netarc` is the ArcFace the official trainer loads from `checkpoints/arcface_checkpoint.tar` (SimSwap's file, an
InsightFace-v2 IR-SE ResNet-101 pickled whole): a ResNet of IRBlocks with squeeze-excitation, an unpadded 3x3 stem
and a max-pool, `fc` over 512x7x7 and `bn3`; key names `conv1, bn1, prelu, layerK.J.{bn0,conv1,bn1,prelu,conv2,bn2,
se.fc.*,downsample.*}, bn2, fc, bn3`. The trainer feeds it the whole [0, 1] image (prediction clamped), resized to
112 with nearest sampling and ImageNet-normalised. The file is read with an unpickler that only admits torch's own
classes and these three names, and its weights are copied into our class of the same shape.

arcface_torch's IResNet (`backbone.pth`, MS1MV3) is the documented fallback when the official file is absent:
RGB in [-1, 1], bilinear to 112. Both output 512-d embeddings (not normalised).
"""

from __future__ import annotations

import logging
import pickle
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from apple_video import weights
from apple_video.errors import WeightsError
from apple_video.weights import ModelFiles

logger = logging.getLogger(__name__)

IdLossModel = Literal["auto", "netarc", "iresnet50", "iresnet100", "tiny", "tiny-netarc"]
NETARC_WEIGHTS, IRESNET_WEIGHTS = "apple-arcface", "arcface-r50"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCFACE_SIZE = 112


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


# -- arcface_torch IResNet (the fallback) ------------------------------------------------------------------------
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
    state = weights.load_checkpoint(path, f"ArcFace checkpoint unreadable: {path}")
    missing, _ = model.load_state_dict(state, strict=False)
    if missing:
        raise WeightsError(f"{path} is not an arcface_torch {arch} checkpoint ({len(missing)} missing keys)")
    return model.eval()


# -- the official netarc (SimSwap / InsightFace-v2 IR-SE ResNet) --------------------------------------------------
class SEBlock(nn.Module):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.PReLU(),
                                nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        return x * self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)


class IRBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 use_se: bool = True) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(inplanes)
        self.conv1 = _conv3x3(inplanes, inplanes)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.prelu = nn.PReLU()  # one slope, shared by both activations of the block
        self.conv2 = _conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.se = SEBlock(planes) if use_se else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.prelu(self.bn1(self.conv1(self.bn0(x))))))
        if self.se is not None:
            out = self.se(out)
        return self.prelu(out + (self.downsample(x) if self.downsample is not None else x))


class NetArc(nn.Module):
    """(B, 3, 112, 112) ImageNet-normalised RGB -> (B, num_features). `(3, 4, 23, 3)` with SE is the official file."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 23, 3), widths: tuple[int, ...] = (64, 128, 256, 512),
                 num_features: int = 512, use_se: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, bias=False)  # unpadded: 112 -> 110 -> pool 55 -> 28 -> 14 -> 7
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.prelu = nn.PReLU()
        self.maxpool = nn.MaxPool2d(2, 2)
        inplanes = widths[0]
        for index, (count, width) in enumerate(zip(layers, widths, strict=True), start=1):
            stride = 1 if index == 1 else 2
            downsample = None
            if stride != 1 or inplanes != width:
                downsample = nn.Sequential(nn.Conv2d(inplanes, width, 1, stride, bias=False), nn.BatchNorm2d(width))
            blocks = [IRBlock(inplanes, width, stride, downsample, use_se)]
            blocks += [IRBlock(width, width, use_se=use_se) for _ in range(count - 1)]
            inplanes = width
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
        self.bn2 = nn.BatchNorm2d(widths[-1])
        self.dropout = nn.Dropout()
        self.fc = nn.Linear(widths[-1] * 7 * 7, num_features)
        self.bn3 = nn.BatchNorm1d(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.prelu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x))
        return self.bn3(self.fc(x.flatten(1)))


def tiny_netarc(seed: int = 0) -> NetArc:
    """The official class with one block per stage and narrow widths, random weights: tests and toy runs."""
    torch.manual_seed(seed)
    return NetArc((1, 1, 1, 1), (16, 16, 32, 32), num_features=32).eval()


_PICKLED_CLASSES = ("ResNet", "IRBlock", "SEBlock", "ArcMarginModel")  # the official pickle's own classes


class _Pickled(nn.Module):
    """What an official class unpickles into: a module that only carries the pickled children and tensors."""


class _NetArcUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _PICKLED_CLASSES:
            return type(name, (_Pickled,), {})
        if (module, name) in (("collections", "OrderedDict"), ("builtins", "set"), ("__builtin__", "set"),
                              ("builtins", "frozenset"), ("numpy.core.multiarray", "scalar"),
                              ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"), ("_codecs", "encode")):  # `acc`
            return super().find_class(module, name)
        if module.startswith(("torch.nn.", "torch._utils", "torch.optim")) or (
                module == "torch" and (name.endswith("Storage") or name in ("Size", "device", "float32"))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected class {module}.{name}")


def _pickle_module() -> types.ModuleType:
    module = types.ModuleType("netarc_pickle")
    module.Unpickler = _NetArcUnpickler
    module.load = lambda handle, **kwargs: _NetArcUnpickler(handle, **kwargs).load()
    return module


def _unwrap(obj) -> dict[str, torch.Tensor]:
    """The state dict inside the official file: a pickled module, `{"model": module or DataParallel}`, or a state dict."""
    if isinstance(obj, dict) and "model" in obj:
        obj = obj["model"]
    if isinstance(obj, nn.DataParallel):
        obj = obj.module
    state = obj.state_dict() if isinstance(obj, nn.Module) else obj
    if not isinstance(state, dict):
        raise WeightsError("no network inside")
    return {k.removeprefix("module."): v for k, v in state.items()}


def netarc_shape(state: dict[str, torch.Tensor]) -> dict:
    """NetArc's constructor arguments read off a state dict (blocks per stage, widths, SE)."""
    layers = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    widths = tuple(int(state[f"layer{i}.0.conv2.weight"].shape[0]) for i in range(1, 5))
    return {"layers": layers, "widths": widths, "num_features": int(state["fc.weight"].shape[0]),
            "use_se": any(".se." in k for k in state)}


def _brief(error: BaseException) -> str:
    return f"{error.__class__.__name__}: {str(error)[:80]}"


def load_netarc(path: Path) -> NetArc:
    """The official `arcface_checkpoint.tar` -> NetArc with its weights, in eval mode."""
    refused = f"{path} is not the official SimSwap arcface_checkpoint.tar"
    checkpoint = weights.load_checkpoint(path, refused, detail=_brief, weights_only=False, pickle_module=_pickle_module())
    with weights.refused_as(refused, detail=_brief):  # a foreign layout
        state = _unwrap(checkpoint)
        model = NetArc(**netarc_shape(state))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise WeightsError(f"{path} does not fit the netarc layout ({len(missing)} missing, {len(unexpected)} unexpected keys)")
    return model.eval()


# -- the loss network as the trainer uses it ---------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    """How a network's input is made from an image in [-1, 1]."""

    size: int
    mode: Literal["nearest", "bilinear"]
    imagenet: bool  # ImageNet mean/std on [0, 1] (netarc); otherwise [-1, 1] as is (arcface_torch)


NETARC_INPUT = Preprocess(ARCFACE_SIZE, "nearest", True)
ARCFACE_TORCH_INPUT = Preprocess(ARCFACE_SIZE, "bilinear", False)


class IdentityNet(nn.Module):
    """An identity network with its input preprocessing: images (B, 3, H, W) in [-1, 1] -> embeddings."""

    def __init__(self, net: nn.Module, preprocess: Preprocess, name: str) -> None:
        super().__init__()
        self.net = net
        self.preprocess = preprocess
        self.name = name

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        p = self.preprocess
        if p.imagenet:  # the official trainer: clamp the prediction to [0, 1], nearest to 112, ImageNet normalise
            x = ((images + 1) / 2).clamp(0, 1)
            x = F.interpolate(x, size=(p.size, p.size), mode=p.mode)
            mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype)[:, None, None]
            std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype)[:, None, None]
            return (x - mean) / std
        if images.shape[-1] != p.size:
            return F.interpolate(images, size=(p.size, p.size), mode=p.mode, align_corners=False)
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare(images))


def identity_files(name: IdLossModel) -> ModelFiles:
    """For a planner: the file the identity network needs (a WeightsError names a missing one); `auto`: the
    official netarc when `apple-arcface` is present, else arcface_torch IResNet-50 (`arcface-r50`)."""
    if name in ("tiny", "tiny-netarc"):
        return ModelFiles()
    if name == "netarc":
        return ModelFiles.resolve([NETARC_WEIGHTS])
    official = ModelFiles.present([NETARC_WEIGHTS]) if name == "auto" else ModelFiles()
    return official if NETARC_WEIGHTS in official else ModelFiles.resolve([IRESNET_WEIGHTS])


def identity_net(name: IdLossModel, files: ModelFiles, seed: int = 0) -> IdentityNet:
    """The identity-loss network from the planner's `files` (see `identity_files`)."""
    if name == "tiny":
        return IdentityNet(tiny_iresnet(seed), Preprocess(32, "bilinear", False), "tiny-iresnet")
    if name == "tiny-netarc":
        return IdentityNet(tiny_netarc(seed), NETARC_INPUT, "tiny-netarc")
    if name == "netarc" or (name == "auto" and NETARC_WEIGHTS in files):
        return IdentityNet(load_netarc(files(NETARC_WEIGHTS)), NETARC_INPUT, "netarc")
    if name == "auto":
        logger.warning("identity loss with arcface_torch IResNet-50 (the official netarc `apple-arcface` is missing; "
                       "see `apple-video weights where`)")
        name = "iresnet50"
    return IdentityNet(load_arcface(files(IRESNET_WEIGHTS), name), ARCFACE_TORCH_INPUT, name)


def identity_loss(model: nn.Module, generated: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Per-sample 1 - cos(F(generated), F(source)); images in [-1, 1], (B, 3, H, W)."""
    a = F.normalize(model(generated), dim=-1)
    with torch.no_grad():
        b = F.normalize(model(source), dim=-1)
    return 1 - (a * b).sum(-1)

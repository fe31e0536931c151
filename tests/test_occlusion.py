"""Issue 25 item 6: what covers the target face stays the target's (`--face-mask-types ... occlusion`)."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from apple_video import weights
from apple_video.engine.render import Renderer
from apple_video.faces.align import transform_points
from apple_video.faces.compose import mask_for
from apple_video.faces.detect import DetectorSettings, create_detector
from apple_video.faces.mask import hull_mask
from apple_video.faces.occlusion import (
    OCCLUSION_WEIGHTS,
    OcclusionConfig,
    build_occlusion_net,
    config_from_state,
    create_occlusion,
    load_occlusion_net,
    occlusion_files,
    occlusion_mask,
)
from apple_video.faces.sources import source_faces
from apple_video.faces.types import FaceTarget
from apple_video.settings import MaskSettings, SwapSettings
from apple_video.swappers.classic import ClassicSwapper
from apple_video.weights import ModelFiles

TINY = OcclusionConfig(blocks=(1, 1, 1, 1), stem_channels=8, base_channels=4, channels=32, c1_channels=8)
HAND = (224, 172, 140)  # a hand's colour


def test_full_network_matches_the_official_file() -> None:
    """The official class, built on the meta device: its weights, their SGD momentum and the auxiliary FCN head
    (training only) come to the published file size within the pickle's overhead."""
    with torch.device("meta"):
        net = build_occlusion_net()
    state = net.state_dict()
    assert "decode_head.sep_bottleneck.1.pointwise_conv.bn.running_var" in state
    assert tuple(state["decode_head.aspp_modules.3.depthwise_conv.conv.weight"].shape) == (2048, 1, 3, 3)
    assert config_from_state(state) == OcclusionConfig()
    params = sum(p.numel() for p in net.parameters())
    buffers = sum(b.numel() for k, b in state.items() if "running" in k)
    aux = 1024 * 256 * 9 + 256 * 4 + 256 * 2 + 2  # auxiliary_head: convs.0 (conv + bn) and conv_seg
    size = ((params + aux) * 2 + buffers) * 4
    published = weights.lookup("occlusion-deeplabv3").size
    assert published and abs(size - published) / published < 1e-3  # weights + optimiser state + aux head, as saved
    assert abs(size - 501_455_936) < 1_000_000, size


def _occluded_target(astronaut: np.ndarray, lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The photo with a hand-coloured blob over the mouth, and that blob's mask."""
    mouth = lm[48:68].mean(0)
    width = np.ptp(lm[48:68, 0])
    blob = np.zeros(astronaut.shape[:2], np.uint8)
    cv2.ellipse(blob, (int(mouth[0]), int(mouth[1])), (int(width * 0.75), int(width * 0.45)), 10, 0, 360, 255, -1)
    out = astronaut.copy()
    out[blob > 0] = HAND
    return out, blob > 0


def _fit_head_to(net, crop: np.ndarray, occluder: np.ndarray) -> None:
    """Set the tiny random network's last layer by (class-balanced) least squares on its own features so that it
    predicts the occluder: a network of the official class whose mask means something, deterministic by
    construction. Random features are weak: it finds the hand and calls part of the face covered too."""
    captured = {}
    hook = net.decode_head.conv_seg.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    occlusion_mask(net, crop)
    hook.remove()
    features = captured["x"][0]  # (C, h, w)
    c, h, w = features.shape
    labels = cv2.resize(occluder.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    x = torch.cat([features.reshape(c, -1).T, torch.ones(h * w, 1)], 1).double()
    occluded = labels.ravel() > 0.5
    y = torch.from_numpy(np.where(occluded, -1.0, 1.0))
    balance = torch.from_numpy(np.where(occluded, 1.0 / occluded.mean(), 1.0 / (1 - occluded.mean())))[:, None].sqrt()
    solution = torch.linalg.lstsq(x * balance, y[:, None] * balance).solution[:, 0].float()
    with torch.no_grad():
        net.decode_head.conv_seg.weight.zero_()
        net.decode_head.conv_seg.bias.zero_()
        net.decode_head.conv_seg.weight[1, :, 0, 0] = solution[:c]
        net.decode_head.conv_seg.bias[1] = solution[c]


def _save_official_layout(net, path: Path) -> None:
    """mmseg's checkpoint layout: meta, state_dict (with the auxiliary FCN head) and the SGD momentum buffers."""
    generator = torch.Generator().manual_seed(1)
    state = dict(net.state_dict())
    aux_in = TINY.base_channels * 4 * 4
    state["auxiliary_head.convs.0.conv.weight"] = torch.randn(256, aux_in, 3, 3, generator=generator)
    for name in ("weight", "bias", "running_mean", "running_var"):
        state[f"auxiliary_head.convs.0.bn.{name}"] = torch.ones(256)
    state["auxiliary_head.conv_seg.weight"] = torch.randn(2, 256, 1, 1, generator=generator)
    state["auxiliary_head.conv_seg.bias"] = torch.zeros(2)
    momentum = {i: {"momentum_buffer": torch.zeros_like(v)} for i, v in enumerate(state.values()) if v.is_floating_point()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": {"iter": 27600, "mmseg_version": "1.2.2"}, "state_dict": state,
                "optimizer": {"state": momentum, "param_groups": [{"lr": 0.01}]}}, path)


@pytest.fixture()
def home(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("APPLE_VIDEO_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_without_the_file_one_line_says_occlusion_is_off(home: Path, caplog) -> None:
    with caplog.at_level(logging.INFO):
        assert create_occlusion(True, occlusion_files(True)) is None
        assert create_occlusion(False, occlusion_files(False)) is None
    lines = [r.getMessage() for r in caplog.records if "occlusion" in r.getMessage()]
    assert len(lines) == 1 and "occlusion-deeplabv3" in lines[0] and "weights where" in lines[0]


def test_what_covers_the_face_stays_the_targets(home: Path, hopper: np.ndarray, astronaut: np.ndarray) -> None:
    detector = create_detector(DetectorSettings(name="dlib"))
    face = detector.detect(astronaut)[0]
    target, occluder = _occluded_target(astronaut, face.landmarks)
    face = detector.detect(target)[0]
    sources = source_faces([hopper], ["hopper"], detector, 256)
    frames = [(0, 0, target)]
    targets = {0: [FaceTarget(0, 0, face.kps, face.landmarks)]}

    plain = Renderer(SwapSettings(swapper="classic", mask=MaskSettings(types=("region",))), ClassicSwapper(), sources)
    group = plain.prepare(frames, targets)
    crop, matrix = group.jobs[0].crop, group.places[0][1]
    crop_occluder = cv2.warpAffine(occluder.astype(np.uint8), matrix, crop.shape[:2][::-1]) > 0

    net = build_occlusion_net(TINY, seed=0)
    _fit_head_to(net, crop, crop_occluder)
    path = home / weights.lookup(OCCLUSION_WEIGHTS).relpath
    _save_official_layout(net, path)
    files = ModelFiles(((OCCLUSION_WEIGHTS, path),))  # the tiny network stands in for the official file
    loaded = load_occlusion_net(files(OCCLUSION_WEIGHTS))  # the real loading code, its shape read from the file
    visible = occlusion_mask(loaded, crop)
    assert np.array_equal(visible, occlusion_mask(net, crop))
    assert (visible[crop_occluder] == 0).mean() > 0.8  # the network sees the hand...
    face_area = hull_mask(group.jobs[0].landmarks, crop.shape[0]) > 0
    assert (visible[face_area & ~crop_occluder] == 1).mean() > 0.4  # ...and much of the face around it

    renderer = Renderer(SwapSettings(swapper="classic", mask=MaskSettings(types=("region", "occlusion"))),
                        ClassicSwapper(), sources, files)
    assert renderer.occlusion is not None
    with_occlusion = renderer.render(frames, targets)[0][0][2]
    without = plain.render(frames, targets)[0][0][2]

    # frame pixels whose crop position the network calls covered (a pixel clear of its edge) are the target's
    ys, xs = np.mgrid[0 : target.shape[0], 0 : target.shape[1]]
    where = np.round(transform_points(np.stack([xs.ravel(), ys.ravel()], 1), matrix)).astype(int).reshape(*xs.shape, 2)
    inside = (where >= 0).all(2) & (where < crop.shape[0]).all(2)
    covered_crop = cv2.erode((visible == 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    covered = np.zeros(target.shape[:2], bool)
    covered[inside] = (covered_crop & face_area)[where[inside][:, 1], where[inside][:, 0]]
    assert covered.sum() > 300
    assert np.array_equal(with_occlusion[covered], target[covered])
    assert np.abs(without[covered].astype(int) - target[covered]).mean() > 3  # without it, the hand was pasted over
    changed = np.abs(with_occlusion.astype(int) - target).sum(2) > 6
    assert changed[~occluder].sum() > 500  # the visible face is still swapped...
    # ...wherever the mask the renderer pasted with (computed here from the same network) keeps at least half of a
    # change over 14 grey levels: the reference is this run's own mask, not a share of the face (how much of the
    # face the stand-in network calls covered moves with numpy/OpenCV releases; a fixed 0.3 share failed at 0.29 on
    # a fresh install, issue 33)
    pasted = mask_for(group.jobs[0].landmarks, crop.shape[0], renderer.settings, None, crop, renderer.occlusion)
    kept = np.zeros(target.shape[:2], bool)
    kept[inside] = (pasted >= 0.5)[where[inside][:, 1], where[inside][:, 0]]
    kept &= (np.abs(without.astype(int) - target).sum(2) > 14) & ~occluder
    assert kept.sum() > 300  # not vacuous (614 here)
    assert changed[kept].mean() > 0.9, changed[kept].mean()  # 1.0: half of > 14 is > 6; 0.9 for resampling at edges


def test_cli_face_mask_types(tmp_path: Path, home: Path, source_photo: Path, astronaut: np.ndarray) -> None:
    """`--face-mask-types box region` (FaceFusion's spelling) swaps; occlusion asked for without its file says so."""
    import subprocess
    import sys

    from PIL import Image

    Image.fromarray(astronaut).save(tmp_path / "t.png")
    root = Path(__file__).resolve().parents[1]
    outs = {}
    for types in (["box", "region"], ["region", "occlusion"]):
        out = tmp_path / f"{'-'.join(types)}.png"
        result = subprocess.run([sys.executable, "-c", "from cli import main; main()", "swap", str(source_photo),
                                 str(tmp_path / "t.png"), "-o", str(out), "--swapper", "classic", "--face-mask-types",
                                 *types], cwd=root, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        outs[tuple(types)] = (np.asarray(Image.open(out).convert("RGB")), result.stderr)
    assert "occlusion masks off" in outs[("region", "occlusion")][1]
    assert "occlusion masks off" not in outs[("box", "region")][1]
    assert not np.array_equal(outs[("box", "region")][0], astronaut)


def test_a_file_that_is_not_the_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    from apple_video.errors import WeightsError

    path = tmp_path / "deeplabv3_iter_27600.pth"
    path.write_bytes(b"not a checkpoint" * 1000)
    with pytest.raises(WeightsError, match="deeplabv3_iter_27600"):
        load_occlusion_net(path)
    torch.save({"state_dict": {"backbone.stem.0.weight": torch.zeros(1)}}, path)
    with pytest.raises(WeightsError, match="not the APPLE DeepLabV3"):
        load_occlusion_net(path)

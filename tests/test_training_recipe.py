"""Training as the official recipe (issue 24) and its scale fixes (issue 26 items 2 and 5), on package photos and
tiny random networks of the official classes: the netarc identity loss, the aesthetic filter, data framing, the
blur region, iris points, sampling, batched pseudo-labels, the bounded identity cache."""

from __future__ import annotations

import dataclasses
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from apple_video.errors import WeightsError
from apple_video.faces.align import alignment_matrix, warp_crop
from apple_video.faces.detect import DetectorSettings, create_detector
from apple_video.weights import ModelFiles
from tests import synth
from tests.training_data import FixedSampler, aligned_faces
from training import arcface, iris
from training.aesthetic import AestheticHead, AestheticScorer, clip_preprocess, load_clip_vision, load_head
from training.arcface import NETARC_INPUT, IdentityNet, NetArc, identity_net, load_netarc, netarc_shape
from training.config import load_train_config
from training.data import FaceData, PrepareSettings, frame_face, on_template, prepare_data, prepare_models
from training.deblur import BLUR_LABELS, blur_region, parse_official, teacher_condition
from training.loop import IdentityCache, IdentityImage, Trainer
from training.stages import TeacherSampler, swap_in_batches

ROOT = Path(__file__).resolve().parent.parent
HOPPER_BOX = (161, 137, 376, 352)


@pytest.fixture()
def no_weights(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("APPLE_VIDEO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "home"


# -- 1: the official identity-loss network -------------------------------------------------------------------------
def _official_pickle(model: NetArc, path: Path, wrap: bool = False) -> None:
    """`model` saved as the official file is: the whole module pickled, its classes at `models.arcface_models`
    (SimSwap's module), optionally inside `{"model": DataParallel(...)}` as InsightFace-v2 saved its checkpoints."""
    fake = types.ModuleType("models.arcface_models")
    names = {NetArc: "ResNet", arcface.IRBlock: "IRBlock", arcface.SEBlock: "SEBlock"}
    for ours, name in names.items():
        setattr(fake, name, type(name, (ours,), {"__module__": "models.arcface_models"}))
    sys.modules["models"] = types.ModuleType("models")
    sys.modules["models.arcface_models"] = fake
    try:
        for module in model.modules():
            if type(module) in names:
                module.__class__ = getattr(fake, names[type(module)])
        torch.save({"epoch": 3, "acc": np.float64(0.99), "model": torch.nn.DataParallel(model)} if wrap else model, path)
    finally:
        del sys.modules["models.arcface_models"], sys.modules["models"]
        for module in model.modules():
            for ours, name in names.items():
                if type(module).__name__ == name:
                    module.__class__ = ours


def test_netarc_is_the_official_shape() -> None:
    model = NetArc()
    tensors = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert 209_280_521 - 600_000 < tensors * 4 < 209_280_521  # fp32 tensors + the pickle's own bytes: the official file
    state = model.state_dict()
    assert netarc_shape(state) == {"layers": (3, 4, 23, 3), "widths": (64, 128, 256, 512), "num_features": 512,
                                   "use_se": True}
    for key in ("conv1.weight", "layer1.0.bn0.weight", "layer3.22.se.fc.0.weight", "layer2.0.downsample.0.weight",
                "bn2.weight", "fc.weight", "bn3.running_mean"):
        assert key in state
    assert tuple(state["fc.weight"].shape) == (512, 512 * 7 * 7)
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 112, 112)).shape == (1, 512)


@pytest.mark.parametrize("wrap", [False, True])
def test_netarc_loads_from_the_official_pickle_layout(tmp_path, wrap) -> None:
    torch.manual_seed(0)
    model = NetArc((1, 2, 1, 1), (16, 16, 32, 32), num_features=64).eval()
    for module in model.modules():  # non-trivial statistics, so that a wrong copy shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "arcface_checkpoint.tar"
    _official_pickle(model, path, wrap)
    loaded = load_netarc(path)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert netarc_shape(loaded.state_dict())["layers"] == (1, 2, 1, 1)


def test_netarc_loader_refuses_foreign_classes(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled code ran",))

    path = tmp_path / "evil.tar"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(WeightsError, match="not the official SimSwap"):
        load_netarc(path)


def test_netarc_preprocessing_as_the_official_trainer() -> None:
    net = IdentityNet(torch.nn.Identity(), NETARC_INPUT, "probe")
    images = torch.rand(2, 3, 512, 512) * 2.4 - 1.2  # a decoded estimate overshoots [-1, 1]
    expected = F.interpolate(((images + 1) / 2).clamp(0, 1), (112, 112))  # nearest by default, as the trainer
    mean = torch.tensor(arcface.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(arcface.IMAGENET_STD)[:, None, None]
    assert torch.allclose(net(images), (expected - mean) / std, atol=1e-6)
    assert net(images).shape == (2, 3, 112, 112)


def test_identity_net_default_and_its_missing_files(no_weights, tmp_path) -> None:
    with pytest.raises(WeightsError, match="apple-arcface"):
        identity_net("netarc", arcface.identity_files("netarc"))
    with pytest.raises(WeightsError, match="arcface-r50"):  # auto without the official file: the fallback
        identity_net("auto", arcface.identity_files("auto"))
    torch.manual_seed(1)
    path = no_weights / "apple" / "arcface_checkpoint.tar"
    path.parent.mkdir(parents=True)
    _official_pickle(NetArc((1, 1, 1, 1), (16, 16, 32, 32), num_features=512).eval(), path)  # over 1 MB
    net = identity_net("auto", ModelFiles((("apple-arcface", path),)))  # the narrow netarc stands in for the file
    assert net.name == "netarc" and net.preprocess == NETARC_INPUT
    assert net(torch.rand(1, 3, 128, 128) * 2 - 1).shape == (1, 512)


# -- 2: LPIPS where the official trainer computes it ---------------------------------------------------------------
def test_lpips_and_id_loss_start_together(tmp_path, faces) -> None:
    cfg = load_train_config(ROOT / "configs" / "train" / "tiny_teacher.yaml", data=tmp_path, output=tmp_path / "run",
                            id_loss_start=5, lpips_weight=1.0, lpips_max_t=1.0, id_loss_max_t=1.0, drop_id=0.0)
    trainer = Trainer(cfg, FixedSampler(faces))
    batch = FixedSampler(faces).batch(None, 2)
    _, before = trainer.loss(batch, 4, np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert set(before) == {"mse"}
    _, after = trainer.loss(batch, 5, np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert {"mse", "id", "lpips"} <= set(after) and after["lpips"] > 0
    assert trainer.arcface.name == "tiny-netarc"


# -- 3: the aesthetic filter ---------------------------------------------------------------------------------------
def _tiny_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    return config, CLIPVisionModelWithProjection(config).eval()


def test_aesthetic_predictor_layout_and_score(tmp_path, astronaut) -> None:
    from safetensors.torch import save_file

    config, clip = _tiny_clip()
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    state["text_model.embeddings.token_embedding.weight"] = torch.zeros(8, 4)  # a CLIPModel file: text is skipped
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = load_clip_vision(tmp_path / "model.safetensors", config)
    head = AestheticHead()
    assert [k for k in head.state_dict()] == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    torch.save(head.state_dict(), tmp_path / "head.pth")
    head = load_head(tmp_path / "head.pth")
    scorer = AestheticScorer(loaded, head)
    photo = astronaut[:300, 50:450]
    got = scorer.score([photo, photo[:, ::-1].copy()])
    with torch.no_grad():
        pixels = clip_preprocess(photo, 56)[None]
        embedding = clip(pixel_values=pixels).image_embeds
        expected = head(embedding / embedding.norm(dim=-1, keepdim=True))[0, 0]
    assert got.shape == (2,) and got[0] == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
    assert got[0] != got[1]
    assert clip_preprocess(photo, 56).shape == (3, 56, 56)  # shorter side to 56, centre crop
    torch.save({"layers.0.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="improved-aesthetic-predictor"):
        load_head(tmp_path / "bad.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="clip-vit-large-patch14"):
        load_clip_vision(tmp_path / "bad.safetensors", config)


def test_min_aesthetic_without_its_files_is_one_line(no_weights, tmp_path, hopper) -> None:
    raw = tmp_path / "raw" / "hopper"
    raw.mkdir(parents=True)
    Image.fromarray(hopper).save(raw / "0.jpg")
    with pytest.raises(WeightsError, match="aesthetic-clip-l14"):
        prepare_data(raw.parent, tmp_path / "out", 128, min_aesthetic=5.1)
    clip = no_weights / "aesthetic" / "clip-vit-large-patch14.safetensors"
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"\0" * 1_000_001)
    with pytest.raises(WeightsError, match="aesthetic-mlp"):
        prepare_data(raw.parent, tmp_path / "out", 128, min_aesthetic=5.1)
    clip.unlink()
    import subprocess

    result = subprocess.run([sys.executable, "-c", "from cli import main; main()", "prepare-data", str(raw.parent), "-o",
                             str(tmp_path / "out2"), "--preset", "tiny", "--min-aesthetic", "5.1"], cwd=ROOT,
                            capture_output=True, text=True, env={**__import__("os").environ, "APPLE_VIDEO_HOME": str(no_weights)})
    assert result.returncode == 2 and "aesthetic-clip-l14" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_real_presets_filter_by_default_and_say_how_to_opt_out(no_weights, tmp_path, hopper) -> None:
    import os
    import subprocess

    raw = tmp_path / "raw" / "hopper"
    raw.mkdir(parents=True)
    Image.fromarray(hopper).save(raw / "0.jpg")
    result = subprocess.run([sys.executable, "-c", "from cli import main; main()", "prepare-data", str(raw.parent), "-o",
                             str(tmp_path / "out"), "--preset", "krea-512"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "APPLE_VIDEO_HOME": str(no_weights)})
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(word in result.stderr for word in ("5.1", "aesthetic-clip-l14", "aesthetic-mlp", "--min-aesthetic 0"))


def test_images_below_the_aesthetic_threshold_stay_identity_images(no_weights, tmp_path, hopper) -> None:
    """The filter picks targets (the official `aes > 5.1`); an image below it stays in the prepared set, recorded in
    the manifest's `identity_only`, never drawn as a target but drawn as its person's identity image."""
    _, clip = _tiny_clip()
    head = AestheticHead()
    scorer = AestheticScorer(clip, head)
    raw = tmp_path / "raw" / "hopper"
    raw.mkdir(parents=True)
    for i, image in enumerate(synth.face_variants(hopper, (161, 137, 376, 352), 4, seed=5)):
        Image.fromarray(image).save(raw / f"{i}.png")
    plain = prepare_data(raw.parent, tmp_path / "plain", 128)
    crops = FaceData.load(tmp_path / "plain").images
    scores = scorer.score([crops[i] for i in range(len(crops))])
    with torch.no_grad():
        head.layers[7].bias += 5.0 - float(np.min(scores))  # scores from 5.0 up: a positive threshold between them
    scores = scores + 5.0 - float(np.min(scores))
    threshold = float(np.median(scores))
    models = dataclasses.replace(prepare_models(None, "auto"), scorer=lambda: scorer)  # the stand-in predictor
    manifest = prepare_data(raw.parent, tmp_path / "filtered", 128, min_aesthetic=threshold, models=models)
    sources = plain["shards"][0]["sources"]
    below = sorted(path for path, score in zip(sources, scores, strict=True) if score <= threshold)
    assert below and len(below) < len(sources) and sorted(manifest["identity_only"]) == below
    assert sum(s["count"] for s in manifest["shards"]) == len(sources) and not manifest["skipped"]
    data = FaceData.load(tmp_path / "filtered")
    assert data.is_target.tolist() == [path not in below for path in manifest["shards"][0]["sources"]]
    batch = TeacherSampler(data).batch(np.random.default_rng(0), 200)
    only = [i for i, t in enumerate(data.is_target) if not t]
    assert not any(any(np.array_equal(target, data.images[i]) for i in only) for target in batch.target)
    assert {item.key for item in batch.identity} >= set(only)


# -- 4: aligned data sets taken as they are ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dlib():
    return create_detector(DetectorSettings(name="dlib"))


def test_aligned_crops_are_recognised_and_kept(no_weights, tmp_path, hopper, dlib) -> None:
    face = dlib.detect(hopper)[0]
    aligned = warp_crop(hopper, alignment_matrix(face.kps, 256), 256)
    on = dlib.detect(aligned)[0]
    assert on_template(on.kps, aligned.shape)
    assert not on_template(face.kps, hopper.shape)  # the photo itself is not framed on the template
    crop, landmarks, how = frame_face(aligned, on, PrepareSettings(128))
    assert how == "as-distributed" and crop.shape == (128, 128, 3)
    assert np.allclose(landmarks, on.landmarks * 0.5)
    photo, _, how = frame_face(hopper, face, PrepareSettings(128))
    assert how == "re-aligned"
    raw = tmp_path / "raw"
    for name, image in (("aligned", aligned), ("photo", hopper)):
        (raw / name).mkdir(parents=True)
        Image.fromarray(image).save(raw / name / "0.png")
    manifest = prepare_data(raw, tmp_path / "out", 256)
    assert manifest["framed"] == {"as-distributed": 1, "re-aligned": 1} and manifest["framing"] == "auto"
    data = FaceData.load(tmp_path / "out")
    kept = [i for i in range(2) if np.array_equal(data.images[i], aligned)]
    assert kept, "the aligned crop was re-warped"
    assert data.kps is not None and data.eva_kps is not None and data.irises is not None
    assert manifest["eva_points"] == manifest["arcface_points"] == "dlib-68-derived"  # no SCRFD, no RetinaFace here
    assert np.array_equal(data.eva_kps[0], data.kps[0]) and data.kps[0].shape == (5, 2)
    assert data.identity_image(0).source_face().eva_kps is not None
    forced = prepare_data(raw, tmp_path / "forced", 256, framing="align")
    assert forced["framed"] == {"as-distributed": 0, "re-aligned": 2}


# -- 5: the blur region --------------------------------------------------------------------------------------------
def test_blur_region_intersects_the_occlusion_mask() -> None:
    labels = np.zeros((8, 8), np.uint8)
    labels[2:6, 2:6] = 1  # skin
    labels[0, :] = 17  # hair: never blurred
    visible = np.ones((8, 8), np.uint8)
    visible[2:4, :] = 0  # a hand over the upper face
    assert np.array_equal(blur_region(labels), np.isin(labels, BLUR_LABELS))
    region = blur_region(labels, visible)
    assert region[4:6, 2:6].all() and not region[2:4].any() and region.sum() == 8
    with pytest.raises(ValueError, match="occlusion mask"):
        blur_region(labels, np.ones((4, 4)))


def test_condition_uses_a_given_region(faces) -> None:
    crop, landmarks, _ = faces[0]
    region = np.zeros(crop.shape[:2], bool)
    region[40:80, 40:80] = True
    out = teacher_condition(crop, landmarks, region=region, irises=np.zeros((0, 2)))
    untouched = ~region
    untouched[np.nonzero(np.any(out != crop, axis=-1) & ~region)] = False  # landmark dots
    assert not np.array_equal(out[region], crop[region])
    assert np.array_equal(out[untouched], crop[untouched])


def test_glasses_are_tinted_only_where_the_face_is_visible(faces) -> None:
    """The official tints glasses on the intersected segmentation (parsing ∩ occlusion mask): glasses under a hand
    keep their pixels when the region says the face is hidden there."""
    crop, landmarks, _ = faces[0]
    labels = np.ones(crop.shape[:2], np.uint8)
    labels[20:60, 10:118] = 6  # glasses across the upper face
    visible = np.ones(crop.shape[:2], np.uint8)
    visible[:40] = 0  # the upper half of the glasses occluded
    none = np.zeros((0, 2))
    free = teacher_condition(crop, np.zeros((0, 2)), labels, none)
    trimmed = teacher_condition(crop, np.zeros((0, 2)), labels, none, region=blur_region(labels, visible))
    assert not np.array_equal(free[20:40], crop[20:40])  # tinted (and blurred) without an occlusion mask
    assert np.array_equal(trimmed[20:40], crop[20:40])  # occluded: neither blurred nor tinted
    assert np.array_equal(trimmed[40:60], free[40:60])  # visible glasses as before


def _upper_half_occluded(crop: np.ndarray) -> np.ndarray:
    """A stand-in occlusion model: something over the upper half of every face."""
    visible = np.ones(crop.shape[:2], np.uint8)
    visible[: crop.shape[0] // 2] = 0
    return visible


def test_prepare_data_records_and_uses_the_occlusion_mask(no_weights, tmp_path, hopper) -> None:
    from facexlib.parsing.bisenet import BiSeNet

    torch.manual_seed(0)
    path = no_weights / "facexlib" / "parsing_bisenet.pth"
    path.parent.mkdir(parents=True)
    torch.save(BiSeNet(num_class=19).state_dict(), path)
    raw = tmp_path / "raw" / "hopper"
    raw.mkdir(parents=True)
    Image.fromarray(hopper).save(raw / "0.png")
    plain = prepare_data(raw.parent, tmp_path / "plain", 128)
    assert plain["blur_region"] == "bisenet-parsing" and plain["parsing_normalisation"] == "imagenet-then-half"
    assert FaceData.load(tmp_path / "plain").regions is None
    models = dataclasses.replace(prepare_models(None, "auto"), occlusion=lambda: _upper_half_occluded)
    manifest = prepare_data(raw.parent, tmp_path / "occluded", 128, models=models)
    assert manifest["blur_region"] == "bisenet-parsing+occlusion"
    data = FaceData.load(tmp_path / "occluded")
    region = data.regions[0]
    assert not region[:64].any() and region[64:].any()  # random BiSeNet weights still label face classes
    assert np.array_equal(region, blur_region(data.labels[0], _upper_half_occluded(data.images[0])))
    assert np.array_equal(data.condition(0), teacher_condition(data.images[0], data.landmarks[0], data.labels[0],
                                                               data.irises[0], region=region))


def test_parsing_uses_the_official_double_normalisation(faces) -> None:
    from facexlib.parsing.bisenet import BiSeNet

    from apple_video.faces.parsing import FaceParser

    torch.manual_seed(0)
    parser = FaceParser(BiSeNet(num_class=19))
    crop = faces[0][0]
    x = (crop.astype(np.float32) / 255 - np.array((0.485, 0.456, 0.406))) / np.array((0.229, 0.224, 0.225))
    x = torch.from_numpy(((x - 0.5) / 0.5).astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = parser.model(x)[0].argmax(1)[0].numpy()
    got = parse_official(parser, crop)
    assert got.shape == crop.shape[:2] and np.array_equal(got, expected)


# -- 6: iris points ------------------------------------------------------------------------------------------------
def _darkest(patch: np.ndarray) -> np.ndarray:
    """A stand-in iris model: the centre of the darkest pixels of the 64x64 patch, and 4 rim points around it."""
    grey = patch.mean(-1)
    ys, xs = np.nonzero(grey <= grey.min() + 0.05)
    c = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
    return np.stack([c, c + (3, 0), c + (0, -3), c - (3, 0), c + (0, 3)])


def test_iris_crops_map_back_to_the_image() -> None:
    image = np.full((200, 200, 3), 220, np.uint8)
    landmarks = np.zeros((68, 2))
    for eye, (cx, cy) in ((range(36, 42), (70, 100)), (range(42, 48), (130, 100))):
        angles = np.linspace(0, 2 * np.pi, 6, endpoint=False)
        landmarks[list(eye)] = np.stack([cx + 15 * np.cos(angles), cy + 6 * np.sin(angles)], 1)
    pupils = ((66, 101), (137, 98))  # looking off-centre: the gaze the estimate from the contour cannot give
    for x, y in pupils:
        image[y - 2 : y + 3, x - 2 : x + 3] = 0
    points = iris.iris_points(image, landmarks, _darkest)
    assert points.shape == (10, 2)
    assert np.allclose(points[0], pupils[0], atol=1.0) and np.allclose(points[5], pupils[1], atol=1.0)
    assert points[1, 0] < points[0, 0]  # the mirrored eye's rim points are mirrored back


def test_iris_model_file_and_runtime(no_weights, tmp_path) -> None:
    assert iris.create_iris_model("auto", iris.iris_files("auto")) == (None, "estimated-from-eye-landmarks")
    with pytest.raises(WeightsError, match="mediapipe-iris"):
        iris.create_iris_model("mediapipe", iris.iris_files("mediapipe"))  # the planner's check names the file
    (tmp_path / "raw" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "raw" / "a" / "0.png")
    with pytest.raises(WeightsError, match="mediapipe-iris"):
        prepare_data(tmp_path / "raw", tmp_path / "out", 128, irises="mediapipe")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\0" * 2048)
    with pytest.raises(WeightsError):  # no runtime, or not a tflite file
        iris.TfliteIris(bad)


@pytest.mark.skipif(not iris.runtime_available(), reason="no LiteRT runtime (pip install ai-edge-litert)")
def test_mediapipe_iris_model_on_a_real_face(faces) -> None:
    from apple_video import weights

    if not weights.is_present("mediapipe-iris"):
        pytest.skip("mediapipe-iris not present")
    model = iris.TfliteIris(weights.require("mediapipe-iris"))
    crop, landmarks, _ = faces[0]
    points = iris.iris_points(crop, landmarks, model)
    for eye, centre in ((range(36, 42), points[0]), (range(42, 48), points[5])):
        contour = landmarks[list(eye)]
        assert contour[:, 0].min() < centre[0] < contour[:, 0].max()
        assert abs(centre[1] - contour[:, 1].mean()) < 0.5 * (contour[:, 0].max() - contour[:, 0].min())


# -- 7: the detector points ArcFace and EVA are aligned on -------------------------------------------------------
def test_retinaface_points_loader_and_missing_file(no_weights, tmp_path, faces) -> None:
    from facexlib.detection.retinaface import RetinaFace

    from apple_video import weights
    from training.retina import RetinaPoints, load_retinaface

    with pytest.raises(WeightsError, match="retinaface-resnet50"):
        RetinaPoints.from_weights(weights.require("retinaface-resnet50"))  # the planner's check names the file
    torch.manual_seed(0)
    model = RetinaFace(network_name="resnet50", half=False, device="cpu")
    path = no_weights / "facexlib" / "detection_Resnet50_Final.pth"
    path.parent.mkdir(parents=True)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)  # as facexlib's release file
    loaded = load_retinaface(path)
    key = next(iter(model.state_dict()))
    assert torch.equal(loaded.state_dict()[key], model.state_dict()[key])
    points = RetinaPoints.from_weights(weights.require("retinaface-resnet50"))(faces[0][0])
    assert points is None or points.shape == (5, 2)  # random weights rarely pass PuLID's 0.97
    torch.save({"x": torch.zeros(3)}, path)
    path.write_bytes(path.read_bytes() + b"\0" * 1_000_000)
    with pytest.raises(WeightsError, match="detection_Resnet50_Final"):
        load_retinaface(path)


def test_eva_input_aligns_on_its_own_points(faces) -> None:
    from apple_video.models.identity import pulid_face_image

    crop, landmarks, embedding = faces[0]
    item = IdentityImage(crop, landmarks, embedding, 0)
    same = pulid_face_image(item.source_face(), None)
    shifted = item.source_face().face.kps + np.array([6.0, 0.0])
    moved = pulid_face_image(IdentityImage(crop, landmarks, embedding, 0, eva_kps=shifted).source_face(), None)
    assert not torch.equal(same, moved)
    kept = IdentityImage(crop, landmarks, embedding, 0, eva_kps=item.source_face().face.kps).source_face()
    assert torch.equal(pulid_face_image(kept, None), same)


# -- 8: sampling ---------------------------------------------------------------------------------------------------
class _Data:
    """A FaceData stand-in of arrays (no shards): three images of A, one of B."""

    def __init__(self, crop: np.ndarray, landmarks: np.ndarray) -> None:
        self.identities = np.array(["A", "A", "A", "B"])
        self.images = [crop + i for i in range(4)]
        self.crop, self.lm = crop, landmarks

    is_target = None
    by_identity = FaceData.by_identity
    target_indices = FaceData.target_indices

    def condition(self, index: int) -> np.ndarray:
        return self.images[index]

    def identity_image(self, index: int) -> IdentityImage:
        return IdentityImage(self.images[index], self.lm, np.zeros(128, np.float32), index)


def test_sampling_is_uniform_over_images_and_may_reuse_the_target(faces) -> None:
    crop, landmarks, _ = faces[0]
    sampler = TeacherSampler(_Data(crop.astype(np.uint8) // 2, landmarks))
    batch = sampler.batch(np.random.default_rng(0), 2000)
    keys = np.array([item.key for item in batch.identity])
    first = crop.astype(np.uint8)[0, 0, 0] // 2
    target_index = batch.target[:, 0, 0, 0].astype(int) - int(first)
    assert np.mean(target_index == 3) == pytest.approx(0.25, abs=0.04)  # B: 1 image of 4, not 1 identity of 2
    same = keys == target_index
    assert np.all(keys[target_index == 3] == 3)  # B's only image is its own identity image
    assert 0.25 < np.mean(same[target_index < 3]) < 0.42  # A: the target itself 1 time in 3
    assert np.all((keys < 3) == (target_index < 3))  # never another person


def test_identity_images_come_from_all_of_a_persons_images(faces) -> None:
    """As the official dataset: the aesthetic filter picks targets only; a person's identity image is drawn from all
    of that person's images, the filtered-out ones included. Held-out identities are never drawn."""
    crop, landmarks, _ = faces[0]
    data = _Data(crop.astype(np.uint8) // 2, landmarks)
    data.is_target = np.array([True, False, True, True])  # A's second image scored below the threshold
    batch = TeacherSampler(data).batch(np.random.default_rng(0), 600)
    first = crop.astype(np.uint8)[0, 0, 0] // 2
    target_index = batch.target[:, 0, 0, 0].astype(int) - int(first)
    keys = np.array([item.key for item in batch.identity])
    assert 1 not in set(target_index) and set(target_index) == {0, 2, 3}
    assert np.mean(keys[target_index < 3] == 1) == pytest.approx(1 / 3, abs=0.07)  # an identity image all the same
    only_b = TeacherSampler(data, {"B"}).batch(np.random.default_rng(1), 50)
    assert all(item.key == 3 for item in only_b.identity)


# -- issue 26.2: pseudo-labels in model-call batches ---------------------------------------------------------------
def test_pseudo_label_swaps_are_batched_and_unchanged(faces) -> None:
    from apple_video.config import load_preset
    from apple_video.models.pipeline import ApplePipeline

    pipe = ApplePipeline.from_preset(load_preset("tiny"), torch.device("cpu"))
    crops = np.stack([f[0] for f in faces][:3] * 2)[:5]
    ids, null = pipe.id_embedding([IdentityImage(c, lm, e, i).source_face() for i, (c, lm, e) in enumerate(faces[:1])])
    ids = ids.expand(5, -1, -1)
    seeds = list(range(5))
    sizes = []
    swap = pipe.swap

    def counted(targets, *args, **kwargs):
        sizes.append(len(targets))
        return swap(targets, *args, **kwargs)

    pipe.swap = counted
    batched = swap_in_batches(pipe, crops, ids, null, seeds, crops, 2)
    assert sizes == [2, 2, 1]
    whole = swap(crops, ids, null, seeds, conditions=crops)
    assert batched.shape == whole.shape and np.abs(batched.astype(int) - whole.astype(int)).max() <= 1


# -- issue 26.5: the identity-token cache is bounded ---------------------------------------------------------------
def test_identity_cache_is_bounded_and_computes_once(tmp_path, faces) -> None:
    cache = IdentityCache(2, tmp_path / "spill")
    calls = []
    for key in (0, 1, 0, 2, 0, 1, 2, 3, 1):
        value = cache.get(key, lambda key=key: calls.append(key) or torch.full((2, 3), float(key)))
        assert torch.equal(value, torch.full((2, 3), float(key)))
        assert len(cache) <= 2
    assert calls == [0, 1, 2, 3]  # each image computed once: the evicted ones come back from the disk
    assert sorted(p.name for p in (tmp_path / "spill").iterdir()) == ["0.pt", "1.pt", "2.pt"]
    memory_only = IdentityCache(1)
    calls.clear()
    for key in (0, 1, 0):
        memory_only.get(key, lambda key=key: calls.append(key) or torch.zeros(1))
    assert calls == [0, 1, 0] and len(memory_only) == 1
    cfg = load_train_config(ROOT / "configs" / "train" / "tiny_teacher.yaml", data=tmp_path, output=tmp_path / "run",
                            id_cache_size=2)
    trainer = Trainer(cfg, FixedSampler(faces))
    seen = []
    identity = trainer.pipe.identity
    trainer.pipe.identity = lambda source: seen.append(1) or identity(source)
    items = FixedSampler(faces).batch(None, 3).identity
    first = trainer._id_tokens(items[:2])
    again = trainer._id_tokens(items[:2])
    assert len(seen) == 2 and torch.equal(first, again)  # no EVA/ArcFace/parsing for a seen image
    trainer._id_tokens(items)
    assert len(trainer.id_cache) == 2 and len(seen) == 3
    trainer._id_tokens(items)  # the evicted one is read back, not recomputed
    assert len(seen) == 3 and (tmp_path / "run" / "id_tokens").is_dir()
    resumed = Trainer(cfg, FixedSampler(faces))  # a new run over the same output: the spilled tokens are read back
    assert resumed.null_id is None
    spilled = int(sorted((tmp_path / "run" / "id_tokens").glob("*.pt"))[0].stem)
    tokens = resumed._id_tokens([items[spilled]])
    assert resumed.id_cache.misses == 0 and torch.equal(tokens[0], trainer.id_cache.get(spilled, None))
    assert resumed.null_id is not None and torch.equal(resumed.null_id, trainer.null_id)


# -- shared fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def faces(astronaut, dlib) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return aligned_faces(astronaut, dlib, 3)

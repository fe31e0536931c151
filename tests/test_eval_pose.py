"""Evaluation figures one can trust: head pose right on every frame (landmark fit without flips, wrapped angle
differences, bad fits missing), the paper's HopeNet in its published layout where its weights are present, the
FaceForensics++ 10-frame and IDBench-V identity-consistency figures, and reports whose numbers keep their units."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from apple_video import weights
from apple_video.evaluate.clip import evaluate_clip, protocol_frames
from apple_video.evaluate.landmarks import (
    MODEL_3D,
    POSE_POINTS,
    camera_matrix,
    euler_angles,
    fit_pose,
    pose_distance,
    pose_error,
    rotation_from_euler,
    wrap_degrees,
)
from apple_video.evaluate.pose import (
    HOPENET_WEIGHTS,
    HopeNet,
    create_pose_estimator,
    hopenet_crop,
    load_hopenet,
    pose_files,
)
from apple_video.evaluate.report import compare_table, markdown, read_json, write_all
from apple_video.settings import EvalSettings
from apple_video.weights import ModelFiles
from tests import talking

ROOT = Path(__file__).resolve().parent.parent
SIZE = (480, 640)


def _projected(yaw: float, pitch: float, roll: float, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """68 landmarks whose 6 pose points are the generic face at a known pose, seen by eval's camera guess."""
    rvec, _ = cv2.Rodrigues(rotation_from_euler(yaw, pitch, roll))
    points, _ = cv2.projectPoints(MODEL_3D, rvec, np.array([[12.0], [-8.0], [400.0]]), camera_matrix(SIZE), None)
    landmarks = np.full((68, 2), 300.0)
    landmarks[POSE_POINTS] = points[:, 0] + np.random.default_rng(seed).normal(0, noise, (6, 2))
    return landmarks


POSES = [(0, 0, 0), (0.5, -0.5, 0.3), (2, 1, -1), (-3, 2, 1), (25, -10, 5), (-40, 15, -20), (60, 5, 0), (0, 35, 0),
         (10, 5, 95), (-5, 3, 120), (8, -6, -135), (0, 0, 179), (-12, 8, -100), (15, 10, 170)]


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_landmark_pose_recovers_known_angles_within_a_degree(noise: float) -> None:
    """Near-frontal faces, turned faces and rolls past 90 degrees (the flipped solutions of the first-solution
    solvePnP read these up to 180 degrees off), each angle within 1 degree, exact and with 0.1 px of landmark noise
    (6 points of a ~150 px face: 0.3 px already moves yaw and pitch by 2 degrees)."""
    for seed, pose in enumerate(POSES):
        fit = fit_pose(_projected(*pose, noise=noise, seed=seed), SIZE)
        assert fit.found, pose
        error = np.abs(wrap_degrees(fit.angles - np.array(pose)))
        assert error.max() < 1.0, (pose, fit.angles)
        rotation, _ = cv2.Rodrigues(fit.rvec)
        assert rotation[2, 2] > 0 and fit.tvec[2, 0] > 0  # facing the camera, in front of it


def test_small_noisy_faces_never_flip() -> None:
    """The issue's case: a face of 20-40 px in a 176x144 camera clip, landmarks off by a pixel. The plain solver's
    first solution there is the flipped one on most frames (roll read ~150-180 degrees off, as frame 80 of the
    issue's clip); the fit here never is more than 60 degrees off, and leaves under 10% of frames missing."""
    size = (144, 176)
    camera = camera_matrix(size)
    rng = np.random.default_rng(0)
    flipped_first, off, missing, count = 0, 0, 0, 200
    for _ in range(count):
        pose = np.array([rng.uniform(-30, 30), rng.uniform(-20, 20), rng.uniform(-40, 40)])
        rvec, _ = cv2.Rodrigues(rotation_from_euler(*pose))
        points, _ = cv2.projectPoints(MODEL_3D, rvec, np.array([[0.0], [0.0], [rng.uniform(600, 1200)]]), camera, None)
        landmarks = np.zeros((68, 2))
        landmarks[POSE_POINTS] = points[:, 0] + rng.normal(0, 1.0, (6, 2))
        _, first, _ = cv2.solvePnP(MODEL_3D, landmarks[POSE_POINTS], camera, None, flags=cv2.SOLVEPNP_ITERATIVE)
        flipped_first += np.abs(wrap_degrees(euler_angles(cv2.Rodrigues(first)[0]) - pose)).max() > 60
        fit = fit_pose(landmarks, size)
        if not fit.found:
            missing += 1
        elif np.abs(wrap_degrees(fit.angles - pose)).max() > 60:
            off += 1
    assert flipped_first > count // 4  # the failure is real in this setting
    assert off == 0 and missing < count // 10, (off, missing)


def test_a_track_keeps_the_pose_across_frames() -> None:
    """Along a track the previous frame's fit seeds the next: a head rolling through 180 degrees stays continuous."""
    previous = None
    for roll in np.arange(150, 211, 6):
        fit = fit_pose(_projected(5, -4, roll, noise=0.2, seed=int(roll)), SIZE, previous)
        assert fit.found and abs(wrap_degrees(fit.angles[2] - roll)) < 1.0, (roll, fit.angles)
        previous = fit


def test_angle_differences_wrap() -> None:
    assert wrap_degrees(np.array([180.0, -180.0, 190.0, -190.0, 359.0, 0.0])).tolist() == [180, 180, -170, 170, -1, 0]
    assert pose_distance(np.array([0.0, 0.0, 179.0]), np.array([0.0, 0.0, -179.0])) == pytest.approx(2.0)
    assert pose_distance(np.array([-170.0, 0, 0]), np.array([170.0, 0, 0])) == pytest.approx(20.0)
    assert math.isnan(pose_distance(np.array([1.0, 2, 3]), np.full(3, np.nan)))


def test_a_bad_fit_is_missing_not_a_number_to_average() -> None:
    good = _projected(10, 5, -15)
    scrambled = good.copy()
    scrambled[POSE_POINTS] = good[POSE_POINTS][[3, 0, 5, 1, 4, 2]]  # no head puts its points there
    assert fit_pose(good, SIZE).found
    assert not fit_pose(scrambled, SIZE).found
    assert math.isnan(pose_error(good, scrambled, SIZE, SIZE))
    assert pose_error(good, _projected(10, 5, -5), SIZE, SIZE) == pytest.approx(10.0, abs=0.5)


# -- HopeNet -------------------------------------------------------------------------------------------------------
def _script():
    spec = importlib.util.spec_from_file_location("make_standins", ROOT / "scripts" / "make_standins.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def hopenet_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The HopeNet stand-in (a reduced-depth network, a few MB: under the real file's smallest size, so the
    catalogue calls it truncated) at its catalogue path in a weights home; the tests hand it in as the file."""
    monkeypatch.setenv("APPLE_VIDEO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return _script().write_hopenet(tmp_path / "home" / weights.lookup(HOPENET_WEIGHTS).relpath)


def _template(key: str) -> str:
    """A state-dict key with its block index removed: the layout's vocabulary, whatever the depth."""
    parts = key.split(".")
    return ".".join(p for i, p in enumerate(parts) if not (i == 1 and parts[0].startswith("layer")))


def test_hopenet_is_the_published_layout_and_its_standin_shares_it(hopenet_home: Path) -> None:
    full = HopeNet().state_dict()
    assert {"fc_yaw.weight", "fc_pitch.weight", "fc_roll.weight", "fc_finetune.weight"} <= set(full)
    assert "fc.weight" not in full and full["fc_yaw.weight"].shape == (66, 2048)
    assert full["fc_finetune.weight"].shape == (3, 2051) and "layer3.5.conv3.weight" in full
    floats = sum(v.numel() * 4 for v in full.values() if v.is_floating_point())
    assert floats > weights.lookup(HOPENET_WEIGHTS).min_bytes  # the entry's smallest size fits the real network
    standin = torch.load(str(hopenet_home), weights_only=True)
    assert {_template(k) for k in standin} == {_template(k) for k in full}
    net = load_hopenet(hopenet_home)
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]


def test_hopenet_angle_is_the_expectation_over_its_bins() -> None:
    torch.manual_seed(0)
    net = HopeNet((1, 1, 1, 1), width=16).eval()
    for head, peak in ((net.fc_yaw, 40), (net.fc_pitch, 10), (net.fc_roll, 33)):
        torch.nn.init.zeros_(head.weight)
        with torch.no_grad():
            head.bias.fill_(-30.0)
            head.bias[peak] = 30.0
    angles = net(torch.zeros(1, 3, 224, 224))[0]
    assert angles.tolist() == pytest.approx([3 * 40 - 99, 3 * 10 - 99, 3 * 33 - 99], abs=1e-3)


def test_hopenet_crop_widens_the_box_as_published(astronaut) -> None:
    crop = hopenet_crop(astronaut, np.array([200, 100, 260, 160]))
    assert crop.shape == (3, 224, 224) and crop.dtype == np.float32
    # the widened box (170..290 x 55..175) resized: its centre column is the box's centre column
    expected = (astronaut[55:175, 170:290].astype(np.float32).mean() / 255 - 0.45) / 0.226
    assert abs(float(crop.mean()) - expected) < 0.1


def test_pose_model_auto_prefers_hopenet_and_every_report_names_it(hopenet_home: Path, source_photo: Path,
                                                                       tmp_path: Path, astronaut) -> None:
    standin = ModelFiles(((HOPENET_WEIGHTS, hopenet_home),))  # what the planner passes down, with the stand-in
    assert create_pose_estimator("auto", standin).kind == "hopenet"
    assert create_pose_estimator("landmarks", standin).kind == "landmarks"
    from PIL import Image

    Image.fromarray(astronaut).save(tmp_path / "a.png")
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(tmp_path / "m.png")
    same = evaluate_clip(source_photo, tmp_path / "a.png", tmp_path / "a.png", files=standin)
    mirrored = evaluate_clip(source_photo, tmp_path / "a.png", tmp_path / "m.png", files=standin)
    assert "HopeNet" in same.models["pose_error_deg"] and same.settings["pose_model"] == "hopenet"
    assert same.metrics["pose_error_deg"] == 0 and mirrored.metrics["pose_error_deg"] > 0
    assert "HopeNet" in markdown(mirrored) and "pose measured by: HopeNet" in mirrored.summary()
    # the pairs runner scores with the same estimator
    from apple_video.evaluate.identity import create_identity_model, eval_detector
    from apple_video.evaluate.runner import Pair, score_pair

    detector = eval_detector()
    model = create_identity_model("dlib", detector)
    pose = create_pose_estimator("auto", standin)
    pair = Pair(0, source_photo, tmp_path / "a.png")
    assert score_pair(pair, tmp_path / "a.png", detector, model, pose)["pose_error_deg"] == 0
    assert score_pair(pair, tmp_path / "m.png", detector, model, pose)["pose_error_deg"] > 0


def test_pose_model_hopenet_without_weights_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              source_photo: Path) -> None:
    monkeypatch.setenv("APPLE_VIDEO_HOME", str(tmp_path))
    assert create_pose_estimator("auto", pose_files("auto")).kind == "landmarks"
    with pytest.raises(weights.WeightsError, match="hopenet-robust-alpha1"):
        create_pose_estimator("hopenet", pose_files("hopenet"))  # the planner's check names the file
    env = {**os.environ, "PYTHONPATH": str(ROOT), "APPLE_VIDEO_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "eval", str(source_photo), str(source_photo),
                             str(source_photo), "--pose-model", "hopenet"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 2 and "hopenet-robust-alpha1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- the video protocols and the report ----------------------------------------------------------------------------
def test_protocol_frames_are_ten_evenly_spaced() -> None:
    assert protocol_frames(51) == [0, 6, 11, 17, 22, 28, 33, 39, 44, 50]
    assert protocol_frames(4) == [0, 1, 2, 3] and protocol_frames(1) == [0]


def test_clip_report_has_the_video_protocols_marks_and_units(tmp_path: Path, source_photo: Path, face_clip: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLE_VIDEO_HOME", str(tmp_path / "none"))  # the landmark fit
    report = evaluate_clip(source_photo, face_clip, face_clip)
    m = report.metrics
    assert m["ff10_pose_error_deg"] == 0 and m["ff10_expression_error_pct"] == 0
    # the 10 frames 0, 6, ..., 50: the last two (50, and 44 in the face part) - frames 45-50 show no face
    assert report.frames["ff10"] == protocol_frames(51) and report.frames["no_face"] == list(range(45, 51))
    ids = [v for v in report.series["id_similarity"] if v is not None]
    assert m["id_variance"] == pytest.approx(np.var(ids)) and m["id_variance"] == pytest.approx(m["id_similarity_std"] ** 2)
    assert m["ff10_id_similarity"] == pytest.approx(m["id_similarity"], abs=0.05)  # the same face throughout
    assert m["pose_error_deg_median"] == 0
    written = write_all(report, tmp_path / "r")
    data = json.loads(written[0].read_text())
    for key in ("pose_error_deg", "pose_error_deg_median", "ff10_id_similarity", "ff10_pose_error_deg",
                "ff10_expression_error_pct", "id_variance"):
        assert key in data["metrics"], key
    assert data["frames"]["no_face"] == list(range(45, 51))
    text = markdown(report)
    assert "| metric | value | better | model | paper | goal |" in text
    assert "| FF++ 10 frames: pose error | 0.000 | lower |" in text
    table = compare_table([("a", report), ("b", read_json(written[0]))])
    assert "| ID variance over frames (IDBench-V) | lower |" in table
    assert "| FF++ 10 frames: ID similarity | higher |" in table


def test_report_png_has_one_unit_per_axis(tmp_path: Path, source_photo: Path, face_clip: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The figures sit in a table (value, paper, goal); every plotted axis carries one series' unit, and the
    frames without a face are shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from apple_video.evaluate import report as report_module

    monkeypatch.setenv("APPLE_VIDEO_HOME", str(tmp_path / "none"))
    report = evaluate_clip(source_photo, face_clip, face_clip)
    report.frames["no_pose"] = [3, 4]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    report_module.plot(report, tmp_path / "r.png")
    axes = figures[0].axes
    plotted = [ax for ax in axes if ax.axison]
    assert not any(ax.containers for ax in axes)  # no bars: the headline figures are not drawn on a common axis
    labels = [ax.get_ylabel() for ax in plotted]
    assert "pose error (deg)" in labels and "flicker (grey levels)" in labels
    assert all(len(ax.get_lines()) <= 3 for ax in plotted)
    pose_axis = plotted[labels.index("pose error (deg)")]
    assert any(line.get_label() == "no pose" for line in pose_axis.get_lines())
    assert sum(len(ax.patches) for ax in plotted) >= 6 * len(plotted)  # the 6 face-less frames shaded on each
    tables = [t for ax in axes for t in ax.tables]
    assert len(tables) == 1
    texts = {cell.get_text().get_text() for cell in tables[0].get_celld().values()}
    assert {"figure", "this run", "paper", "goal", "1.85", "<= 1.85 deg"} <= texts
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_talking_head_clip_has_no_pose_spike(tmp_path: Path, source_photo: Path, astronaut_patch: np.ndarray,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A talking, nodding head at CIF size (176x144, the issue's camera clip) swapped by the classic swapper: no
    frame reads a pose error over 60 degrees (measured at most 6.8 over 120 frames; 7.7 on a 960x540 one),
    mean and median both in the JSON."""
    from apple_video.engine.run import swap_video
    from apple_video.evaluate.identity import eval_detector
    from apple_video.settings import SwapSettings

    monkeypatch.setenv("APPLE_VIDEO_HOME", str(tmp_path / "none"))
    landmarks = eval_detector().detect(astronaut_patch)[0].landmarks
    talk = talking.Talk("cif-nodding", 0.55, (176, 144), 8.0, 6.5, 6.0, 12.0, 4)
    clip = talking.write_talk(tmp_path, astronaut_patch, landmarks, talk, count=40)
    swapped = tmp_path / "swapped.mp4"
    swap_video([source_photo], clip, swapped, SwapSettings(swapper="classic"))
    report = evaluate_clip(source_photo, clip, swapped, EvalSettings(identity_model="dlib"))
    poses = [v for v in report.series["pose_error_deg"] if v is not None]
    assert len(poses) >= 36 and max(poses) < 60, max(poses)
    data = json.loads(write_all(report, tmp_path / "r")[0].read_text())
    assert data["metrics"]["pose_error_deg"] == pytest.approx(np.mean(poses))
    assert data["metrics"]["pose_error_deg_median"] == pytest.approx(np.median(poses))

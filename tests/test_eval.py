"""`apple-video eval` on real media: the metrics respond to what changed and to nothing else."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from apple_video.engine.run import swap_image
from apple_video.errors import InputError, OutputError, WeightsError
from apple_video.evaluate.clip import eval_files, evaluate_clip
from apple_video.evaluate.fid import (
    FID_WEIGHTS,
    FIDInception,
    activations,
    frechet_distance,
    load_fid_inception,
)
from apple_video.evaluate.identity import (
    best_face,
    create_identity_model,
    eval_detector,
    identity_files,
    measure_scale,
    package_photos,
    photo_variants,
    retrieval,
)
from apple_video.evaluate.landmarks import expression_distance, head_pose, pose_error
from apple_video.evaluate.report import compare_table, markdown, read_json, write_all
from apple_video.evaluate.runner import read_pairs, run_pairs
from apple_video.progress import LogProgress
from apple_video.settings import EvalSettings, SwapSettings


@pytest.fixture()
def weights_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "weights"
    monkeypatch.setenv("APPLE_VIDEO_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return home


def _folder(path: Path, frames: list[np.ndarray]) -> Path:
    path.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(path / f"f{i:03d}.png")
    return path


def test_identical_image_scores_identity_one_and_zero_errors(tmp_path: Path, source_photo: Path) -> None:
    """Identical inputs take the metrics' exact shortcut; test_pose_and_expression_helpers checks the metrics."""
    report = evaluate_clip(source_photo, source_photo, source_photo)
    m = report.metrics
    assert report.kind == "image" and report.counts == {"frames": 1, "frames_with_face": 1, "frames_with_pose": 1}
    assert m["id_similarity"] == pytest.approx(1.0, abs=1e-9)
    assert m["pose_error_deg"] == 0 and m["expression_error_pct"] == 0 and m["background_psnr_db"] == 99.0
    assert "dlib" in report.models["id_similarity"] and "solvePnP" in report.models["pose_error_deg"]
    assert "different people" in report.scale["text"]


def test_identical_clip_scores_as_untouched(source_photo: Path, face_clip: Path) -> None:
    report = evaluate_clip(source_photo, face_clip, face_clip)
    m = report.metrics
    assert report.counts == {"frames": 51, "frames_with_face": 45, "frames_with_pose": 45}
    assert m["pose_error_deg"] == 0 and m["expression_error_pct"] == 0
    assert m["flicker_ratio"] == 1.0 and m["jitter_ratio"] == 1.0 and m["background_psnr_db"] == 99.0
    assert m["id_closer_to_source"] == 0  # the astronaut is not Grace Hopper
    assert len(report.series["pose_error_deg"]) == 51
    assert sum(v is not None for v in report.series["id_similarity"]) == 6  # frames 0, 8, ..., 40
    assert "DIS" in report.models["flicker_ratio"]


def test_injected_jitter_scores_worse_flicker(tmp_path: Path, source_photo: Path, clip_frames) -> None:
    clean = clip_frames[:16]
    rng = np.random.default_rng(3)
    jittered = []
    for frame in clean:  # a shaking, brightness-pumping face, as an unstable swap looks
        dy, dx = rng.integers(-3, 4, 2)
        shaken = np.roll(frame, (int(dy), int(dx)), axis=(0, 1)).astype(np.int16) + int(rng.integers(-12, 13))
        jittered.append(np.clip(shaken, 0, 255).astype(np.uint8))
    clean_dir, jitter_dir = _folder(tmp_path / "clean", clean), _folder(tmp_path / "jitter", jittered)
    calm = evaluate_clip(source_photo, clean_dir, clean_dir).metrics
    shaky = evaluate_clip(source_photo, clean_dir, jitter_dir).metrics
    assert calm["flicker_ratio"] == 1.0
    assert shaky["flicker_ratio"] > 2 * calm["flicker_ratio"]
    assert shaky["flicker_swapped"] > shaky["flicker_original"]


def test_a_swap_moves_identity_and_keeps_pose(tmp_path: Path, source_photo: Path, clip_frames) -> None:
    target = tmp_path / "t.png"
    Image.fromarray(clip_frames[20]).save(target)
    swap_image([source_photo], target, tmp_path / "o.png", SwapSettings(swapper="classic"))
    m = evaluate_clip(source_photo, target, tmp_path / "o.png").metrics
    assert m["id_closer_to_source"] == 1.0 and m["pose_error_deg"] < 10 and m["background_psnr_db"] > 40


def test_pose_and_expression_helpers(astronaut) -> None:
    face = eval_detector().detect(astronaut)[0]
    pose = head_pose(face.landmarks, astronaut.shape[:2])
    assert np.all(np.abs(pose) < 30)  # a frontal portrait
    assert expression_distance(face.landmarks, face.landmarks) == 0
    opened = face.landmarks.copy()
    opened[57] += (0, 8)  # lower lip down
    assert expression_distance(face.landmarks, opened) > 0
    # the metrics themselves, not their shortcut for identical inputs: a face moved, scaled and turned in the
    # picture keeps its expression; a tiny nudge keeps its pose; a 10 degree in-plane turn is a 10 degree roll
    angle = np.radians(10)
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = face.landmarks.mean(0)
    turned = (face.landmarks - centre) @ turn.T + centre
    moved = 1.3 * turned + (15.0, -9.0)
    assert expression_distance(face.landmarks, moved) < 1e-6
    size = astronaut.shape[:2]
    assert pose_error(face.landmarks, face.landmarks + 1e-6, size, size) < 0.01
    roll = head_pose(turned, size)[2] - pose[2]
    assert abs(abs(roll) - 10) < 1.5, roll
    assert 8 < pose_error(face.landmarks, turned, size, size) < 13


def _lfw_faces(count: int) -> list[np.ndarray]:
    """Distractors: small LFW faces shipped by scikit-image, enlarged so the detector finds them."""
    faces = []
    for face in skimage.data.lfw_subset()[:count]:
        grey = np.asarray(Image.fromarray((face * 255).astype(np.uint8)).resize((200, 200), Image.BICUBIC))
        faces.append(np.dstack([np.pad(grey, 60, mode="edge")] * 3))
    return faces


def test_retrieval_finds_each_person_in_a_gallery_of_real_photos() -> None:
    detector = eval_detector()
    model = create_identity_model("dlib", detector)
    people = list(package_photos().values())
    assert len(people) == 2

    def embed(rgb: np.ndarray) -> np.ndarray:
        return model.embed(rgb, best_face(detector.detect(rgb, embed=False)))

    gallery = np.stack([embed(p) for p in people + _lfw_faces(4)])
    queries, labels = [], []
    for label, photo in enumerate(people):
        for variant in photo_variants(photo)[1:]:  # mirrored, re-framed, recompressed: not the gallery photo
            queries.append(embed(variant))
            labels.append(label)
    result = retrieval(np.stack(queries), gallery, labels)
    assert result.top1 == 1.0 and result.ranks == [0] * 6
    swapped_labels = retrieval(np.stack(queries), gallery, [1 - label for label in labels])
    assert swapped_labels.top1 == 0.0  # the wrong person is never ranked first


def test_similarity_scale_separates_same_and_different_people() -> None:
    detector = eval_detector()
    scale = measure_scale(create_identity_model("dlib", detector), detector)
    assert scale.same_person > scale.threshold > scale.different_person
    assert "0.6" in scale.text()


def _random_inception() -> FIDInception:
    torch.manual_seed(0)
    net = FIDInception().eval()
    for module in net.modules():  # unit-variance activations (the default init makes them vanish)
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    return net


def _crops(photo: np.ndarray, seed: int, n: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [photo[y : y + 400, x : x + 400] for y, x in rng.integers(0, 100, (n, 2))]


def test_frechet_distance_matches_the_matrix_square_root_formula() -> None:
    from scipy import linalg

    rng = np.random.default_rng(0)
    for n in (5, 40):  # fewer and more samples than dimensions: both branches
        a, b = rng.normal(size=(n, 12)), rng.normal(0.3, 1.5, size=(n + 3, 12))
        cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        expected = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a) + np.trace(cov_b)
                    - 2 * np.trace(np.real(linalg.sqrtm(cov_a @ cov_b))))
        assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_fid_on_a_random_inception_of_the_real_class(astronaut) -> None:
    net = _random_inception()
    a = activations(net, _crops(astronaut, 0), batch=3)
    b = activations(net, _crops(astronaut, 1), batch=3)
    c = activations(net, _crops(skimage.data.coffee(), 0), batch=3)
    assert a.shape == (4, 2048)
    same_photo, other_photo = frechet_distance(a, b), frechet_distance(a, c)
    assert abs(frechet_distance(a, a)) < 1e-3 * same_photo  # zero up to the square root's rounding
    assert 0 < same_photo < other_photo


def test_fid_weights_load_from_the_catalogue_and_missing_ones_are_a_clear_error(weights_home: Path, astronaut) -> None:
    with pytest.raises(WeightsError, match="fid-inception"):
        eval_files("dlib", "landmarks", fid=True)  # the eval's planner checks the file before any work
    net = _random_inception()
    path = weights_home / "fid" / "pt_inception-2015-12-05-6726825d.pth"
    path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), path)
    loaded = load_fid_inception(eval_files("dlib", "landmarks", fid=True)(FID_WEIGHTS))
    crops = _crops(astronaut, 0, 2)
    np.testing.assert_allclose(activations(loaded, crops), activations(net, crops), rtol=1e-5, atol=1e-6)


def test_missing_identity_and_fid_weights_fail_before_any_work(tmp_path: Path, weights_home: Path, source_photo: Path,
                                                                 astronaut) -> None:
    with pytest.raises(WeightsError, match="arcface-w600k"):
        create_identity_model("insightface", eval_detector(), identity_files("insightface"))
    Image.fromarray(astronaut).save(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text(f"{source_photo},a.png\n")
    (tmp_path / "ref").mkdir()
    for i in range(2):
        Image.fromarray(astronaut[i:]).save(tmp_path / "ref" / f"{i}.png")
    with pytest.raises(WeightsError, match="fid-inception"):
        run_pairs(tmp_path / "pairs.csv", tmp_path / "run", SwapSettings(swapper="classic"),
                  EvalSettings(fid_reference=str(tmp_path / "ref")))
    assert not (tmp_path / "run").exists()


def test_pairs_list_formats(tmp_path: Path, source_photo: Path) -> None:
    Image.open(source_photo).save(tmp_path / "b.png")
    (tmp_path / "p.txt").write_text(f"# comment\n{source_photo} b.png\n\nb.png\t{source_photo}\n")
    pairs = read_pairs(tmp_path / "p.txt")
    assert [(p.source.name, p.target.name) for p in pairs] == [("source.jpg", "b.png"), ("b.png", "source.jpg")]
    (tmp_path / "bad.csv").write_text("source,target\nb.png,missing.png\n")
    with pytest.raises(InputError, match="line 2"):
        read_pairs(tmp_path / "bad.csv")


def test_pairs_run_swaps_scores_resumes_and_reports(tmp_path: Path, source_photo: Path, astronaut) -> None:
    Image.fromarray(astronaut).save(tmp_path / "astronaut.png")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"source,target\n{source_photo},astronaut.png\nastronaut.png,{source_photo}\n")
    folder = tmp_path / "run"
    report = run_pairs(pairs, folder, SwapSettings(swapper="classic"))
    assert report.counts == {"pairs": 2, "scored": 2, "sources": 2}
    # each swapped face is retrieved as its own source among all sources, and is closer to it than chance
    assert report.metrics["retrieval_top1"] == 1.0 and report.series["retrieval_rank"] == [0.0, 0.0]
    assert report.metrics["id_similarity"] > report.scale["different_person"]
    assert report.metrics["pose_error_deg"] < 15 and report.metrics["fid"] is None
    assert {p.name for p in folder.iterdir()} >= {"swaps", "scores.jsonl", "run.json", "report.json", "report.md",
                                                  "report.png"}
    swaps = sorted((folder / "swaps").iterdir())
    stamps = [p.stat().st_mtime_ns for p in swaps]
    again = run_pairs(pairs, folder, SwapSettings(swapper="classic"))  # resumes: nothing swapped or scored twice
    assert [p.stat().st_mtime_ns for p in swaps] == stamps
    assert len((folder / "scores.jsonl").read_text().splitlines()) == 2
    assert again.metrics == report.metrics
    with pytest.raises(OutputError, match="other pairs or settings"):
        run_pairs(pairs, folder, SwapSettings(swapper="classic", seed=1))
    assert read_json(folder / "report.json").metrics == report.metrics
    (folder / "mine.txt").write_text("the user's")
    run_pairs(pairs, folder, SwapSettings(swapper="classic", seed=1), force=True)  # starts over, keeps other files
    assert (folder / "mine.txt").exists() and json.loads((folder / "run.json").read_text())["swap"]["seed"] == 1


def test_reports_side_by_side(tmp_path: Path, source_photo: Path, face_clip: Path) -> None:
    report = evaluate_clip(source_photo, face_clip, face_clip)
    written = write_all(report, tmp_path / "a" / "run")
    assert [p.suffix for p in written] == [".json", ".md", ".png"]
    assert Image.open(written[2]).size[0] > 600
    data = json.loads(written[0].read_text())
    assert data["settings"]["id_every"] == 8 and "flicker_ratio" in data["models"]
    assert "| face flicker / original's | 1.000 |" in markdown(report)
    other = read_json(written[0])
    other.metrics["pose_error_deg"] = 2.5
    table = compare_table([("clean", report), ("worse", other)])
    assert "| metric | better | clean | worse | paper |" in table
    assert "| pose error (yaw/pitch/roll L2) | lower | 0.000 | 2.500 | 1.85 |" in table
    with pytest.raises(InputError, match="not an evaluation report"):
        read_json(tmp_path / "a" / "run.md")


def test_log_progress_when_not_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="apple_video"), LogProgress(10, "eval", every_s=0.0) as bar:
        bar.update(4)
    assert "eval: 4/10" in caplog.text


def test_cli_short_form_and_report_table(tmp_path: Path, source_photo: Path) -> None:
    from cli import main

    Image.open(source_photo).save(tmp_path / "t.png")
    main(["eval", str(source_photo), str(tmp_path / "t.png"), str(tmp_path / "t.png"), "--report",
          str(tmp_path / "r"), "--json", str(tmp_path / "m.json")])
    assert (tmp_path / "r.png").exists() and (tmp_path / "m.json").exists()
    main(["eval", "report", str(tmp_path / "r.json"), str(tmp_path / "m.json"), "-o", str(tmp_path / "t.md")])
    table = (tmp_path / "t.md").read_text()
    assert "| metric | better | r | m | paper |" in table
    assert "| ID similarity (cosine to source) | higher | 1.000 | 1.000 | 0.54 |" in table


@pytest.mark.slow
def test_pairs_run_with_the_tiny_apple_preset(tmp_path: Path, source_photo: Path, astronaut) -> None:
    """The runner drives the APPLE swapper (one model load for all pairs); random weights: only the plumbing."""
    from apple_video.settings import ModelOptions

    Image.fromarray(astronaut).save(tmp_path / "astronaut.png")
    (tmp_path / "pairs.txt").write_text(f"{source_photo} astronaut.png\nastronaut.png {source_photo}\n")
    settings = SwapSettings(swapper="apple", model=ModelOptions(preset="tiny"))
    report = run_pairs(tmp_path / "pairs.txt", tmp_path / "run", settings)
    assert report.settings["swapper"] == "apple" and report.settings["swap"]["model"]["preset"] == "tiny"
    assert len(list((tmp_path / "run" / "swaps").iterdir())) == 2
    unscored = [n for n in report.notes if "not scored" in n]  # random weights may leave no detectable face
    assert report.counts["pairs"] == 2 and report.counts["scored"] + len(unscored) == 2

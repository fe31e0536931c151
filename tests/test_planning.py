"""Everything a bad input can fail on is found in planning: before a swapper is announced or built, a progress
line drawn or a job folder written. Batches: items refused up front, outputs named once, manifests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from apple_video.engine.batch import BatchItem, output_names, read_manifest
from apple_video.engine.factories import EngineFactories, quiet_detector
from apple_video.engine.job import plan_job
from apple_video.errors import InputError, UserError
from apple_video.swappers.classic import ClassicSwapper
from tests import synth

ROOT = Path(__file__).resolve().parent.parent
EXE = [sys.executable, "-c", "from cli import main; main()"]


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*EXE, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def _options(args: list[str]) -> tuple[dict, set[str]]:
    import cli

    ctx = cli.cli.commands["swap"].make_context("swap", list(args))
    return dict(ctx.params), cli._given(ctx, dict(ctx.params))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory, face_clip: Path) -> dict[str, tuple[str, str]]:
    """The five bad inputs of a new user's pass: (source, target) each, with the error's fragment."""
    folder = tmp_path_factory.mktemp("bad")
    (folder / "text.mp4").write_text("hello\n" * 100)
    data = face_clip.read_bytes()
    (folder / "cut.mp4").write_bytes(data[: len(data) // 2])
    with av.open(str(folder / "audio.mp4"), "w") as out:
        stream = out.add_stream("aac", rate=44100)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((2, 1024), np.float32), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = 44100, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    Image.fromarray(synth.background(200, 200)).save(folder / "noface.png")
    (folder / "notimage.jpg").write_text("not an image\n")
    return {"text": ("source", "text.mp4"), "truncated": ("source", "cut.mp4"), "audio": ("source", "audio.mp4"),
            "faceless source": ("noface.png", "face"), "source not an image": ("notimage.jpg", "face")}, folder


CASES = {"text": "not a readable video", "truncated": "cut.mp4", "audio": "no video stream",
         "faceless source": "no face found in the source photo", "source not an image": "cannot read image"}


def _paths(bad_inputs, case: str, source_photo: Path, face_clip: Path) -> tuple[Path, Path]:
    cases, folder = bad_inputs
    source, target = cases[case]
    return (source_photo if source == "source" else folder / source), (face_clip if target == "face" else folder / target)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_in_planning_with_no_model_built(tmp_path: Path, source_photo: Path, face_clip: Path,
                                                              bad_inputs, case: str) -> None:
    source, target = _paths(bad_inputs, case, source_photo, face_clip)
    built: list[object] = []

    def swapper() -> ClassicSwapper:
        built.append(1)
        return ClassicSwapper()

    factories = EngineFactories(swapper=swapper, detector=quiet_detector)
    output = tmp_path / "out" / "out.mp4"
    output.parent.mkdir()
    options, given = _options([str(source), str(target), "-o", str(output), "--preset", "tiny"])
    with pytest.raises(UserError, match=CASES[case]):
        plan_job("swap", options, given).run(factories)
    assert built == []  # planning refused it: no swapper was built
    assert not any(output.parent.iterdir())


@pytest.mark.parametrize("case", ["text", "faceless source"])
def test_bad_input_is_one_line_before_any_announcement_or_progress(tmp_path: Path, source_photo: Path,
                                                                    face_clip: Path, bad_inputs, case: str) -> None:
    source, target = _paths(bad_inputs, case, source_photo, face_clip)
    result = _cli("swap", str(source), str(target), "-o", str(tmp_path / "out.mp4"), "--preset", "tiny")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and CASES[case] in lines[0], result.stderr
    assert not any(tmp_path.iterdir())  # no output, no job folder, no lock


@pytest.mark.parametrize("option, missing", [("--face-parser bisenet", "bisenet-parsing"),
                                             ("--face-detector insightface", "antelopev2-det")])
def test_a_named_model_without_its_file_is_refused_in_planning(tmp_path: Path, source_photo: Path, face_clip: Path,
                                                               monkeypatch: pytest.MonkeyPatch, option: str,
                                                               missing: str) -> None:
    """The planner resolves every model file the run loads (detector and parser included), once: a missing one is
    one line and exit 2 before the swapper is announced or anything is written."""
    monkeypatch.setenv("APPLE_VIDEO_HOME", str(tmp_path / "home"))  # an empty catalogue home
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "out"
    out.mkdir()
    result = _cli("swap", str(source_photo), str(face_clip), "-o", str(out / "o.mp4"), "--swapper", "classic",
                  *option.split())
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"model file missing: {missing}" in lines[0], result.stderr
    assert not any(out.iterdir())


def test_run_that_finds_no_face_leaves_no_job_folder(tmp_path: Path, source_photo: Path, noface_clip: Path) -> None:
    result = _cli("swap", str(source_photo), str(noface_clip), "-o", str(tmp_path / "out.mp4"), "--swapper", "classic")
    assert result.returncode == 2 and "no face to swap" in result.stderr
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())


def test_output_names_are_planned_once_for_the_batch(tmp_path: Path) -> None:
    s = (tmp_path / "s.jpg",)
    items = [BatchItem(s, tmp_path / "a" / "clip.mp4"), BatchItem(s, tmp_path / "b" / "clip.mp4"),
             BatchItem(s, tmp_path / "a" / "clip.mp4"), BatchItem((tmp_path / "t.jpg",), tmp_path / "a" / "clip.mp4"),
             BatchItem(s, tmp_path / "c.mp4", "clip-3.mp4")]
    # the duplicate runs once; the other clip.mp4s get -2, then -4 (clip-3.mp4 is a name given by a row)
    assert output_names(items) == ["clip.mp4", "clip-2.mp4", None, "clip-4.mp4", "clip-3.mp4"]
    with pytest.raises(InputError, match="row 2: output name x.mp4 is also jobs.csv row 1's"):
        output_names([BatchItem(s, tmp_path / "a.mp4", "x.mp4", "jobs.csv row 1"),
                      BatchItem(s, tmp_path / "b.mp4", "x.mp4", "jobs.csv row 2")])


def test_manifest_rows_relative_to_the_file(tmp_path: Path) -> None:
    manifest = tmp_path / "jobs.csv"
    manifest.write_text("source,target,output\n# a comment\nfaces/a.jpg;faces/b.jpg, clips/x.mp4\n"
                        "/abs/c.jpg,y.mp4,named.mkv\n\n")
    items = read_manifest(manifest)
    assert [i.sources for i in items] == [(tmp_path / "faces/a.jpg", tmp_path / "faces/b.jpg"), (Path("/abs/c.jpg"),)]
    assert [(i.target, i.name, i.where) for i in items] == [(tmp_path / "clips/x.mp4", None, "jobs.csv row 3"),
                                                           (tmp_path / "y.mp4", "named.mkv", "jobs.csv row 4")]
    manifest.write_text("a.jpg\n")
    with pytest.raises(InputError, match="jobs.csv row 1: expected `source"):
        read_manifest(manifest)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory, clip_frames, source_photo: Path, astronaut: np.ndarray) -> Path:
    """Three rows, three different sources (one photo, another, both), three short clips; two share a name."""
    folder = tmp_path_factory.mktemp("manifest")
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    synth.write_clip(folder / "a" / "clip.mp4", clip_frames[:10], fps=15)
    synth.write_clip(folder / "b" / "clip.mp4", clip_frames[10:20], fps=15)
    synth.write_clip(folder / "c.mp4", clip_frames[20:30], fps=15)
    Image.open(source_photo).save(folder / "hopper.jpg")
    Image.fromarray(astronaut).save(folder / "astronaut.png")
    path = folder / "jobs.csv"
    path.write_text("source,target,output\nhopper.jpg,a/clip.mp4\nastronaut.png,b/clip.mp4\n"
                    "hopper.jpg;astronaut.png,c.mp4,both.mp4\n")
    return path


def _batch(manifest: Path, output: Path, **settings):
    from apple_video.engine.batch import run_batch
    from apple_video.settings import SwapSettings

    return run_batch([], manifest, output, SwapSettings(swapper="classic", chunk_frames=4, **settings))


def test_manifest_batch_runs_locally_and_on_ray_alike_and_resumes(tmp_path: Path, manifest: Path) -> None:
    local = _batch(manifest, tmp_path / "local")
    assert [Path(s.output).name for s in local.summaries] == ["clip.mp4", "clip-2.mp4", "both.mp4"]
    assert [s.status for s in local.summaries] == ["ok"] * 3 and all(s.faces_swapped >= 8 for s in local.summaries)
    outputs = {name: (tmp_path / "local" / name).read_bytes() for name in ("clip.mp4", "clip-2.mp4", "both.mp4")}
    assert len(set(outputs.values())) == 3  # three sources, three different swaps
    ray = _batch(manifest, tmp_path / "ray", executor="ray", workers=2)
    assert [s.status for s in ray.summaries] == ["ok"] * 3
    assert {name: (tmp_path / "ray" / name).read_bytes() for name in outputs} == outputs
    (tmp_path / "ray" / "clip-2.mp4").unlink()
    again = _batch(manifest, tmp_path / "ray", executor="ray", workers=2)
    assert [s.done_earlier for s in again.summaries] == [True, False, True]
    assert (tmp_path / "ray" / "clip-2.mp4").read_bytes() == outputs["clip-2.mp4"]


def test_batch_lists_a_bad_row_before_work_and_runs_the_rest(tmp_path: Path, manifest: Path) -> None:
    bad = manifest.parent / "bad.csv"
    bad.write_text(manifest.read_text() + "hopper.jpg,missing.mp4\n")
    result = _cli("swap", "--manifest", str(bad), "-o", str(tmp_path / "out"), "--swapper", "classic",
                  "--chunk-frames", "4")
    assert result.returncode == 2, result.stderr  # only a bad input failed
    errors = [i for i, line in enumerate(result.stderr.splitlines()) if line.startswith("error:")]
    progress = [i for i, line in enumerate(result.stderr.splitlines()) if line.startswith(("analyze:", "swap:"))]
    assert len(errors) == 1 and "bad.csv row 5" in result.stderr.splitlines()[errors[0]], result.stderr
    assert errors[0] < min(progress), result.stderr  # refused before any work
    assert "3 of 4 clips done" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["both.mp4", "clip-2.mp4", "clip.mp4"]


def test_lora_names_its_preset_and_refusals_come_in_planning(tmp_path: Path, source_photo: Path,
                                                             face_clip: Path) -> None:
    from safetensors.numpy import save_file

    from apple_video.engine.job import plan_job
    from apple_video.models.lora import LORA_PRESET_KEY
    from apple_video.weights import is_present

    lora = tmp_path / "student.safetensors"
    save_file({"x.lora_A.weight": np.zeros((2, 2), np.float32)}, str(lora), metadata={LORA_PRESET_KEY: "tiny"})
    base = [str(source_photo), str(face_clip), "-o", str(tmp_path / "o.mp4")]
    job = plan_job("swap", *_options([*base, "--lora", str(lora)]))
    assert job.settings.model.preset == "tiny" and job.settings.model.lora == str(lora)
    assert plan_job("swap", *_options([*base, "--lora", str(lora), "--preset", "krea-512", "--swapper", "classic"])
                    ).settings.model.preset == "krea-512"  # --preset given: it wins
    # space-separated regions (FaceFusion's form) reach the settings, not the paths
    import cli

    params, _ = _options(cli._expand_nargs(["--face-mask-regions", "skin", "nose", *base]))
    assert params["face_mask_regions"] == ("skin", "nose") and params["paths"] == (str(source_photo), str(face_clip))
    import torch

    if not torch.cuda.is_available():
        result = _cli("swap", *base, "--preset", "tiny", "--fp8")
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "--fp8 needs" in result.stderr and "swapper:" not in result.stderr
    if not is_present("antelopev2-det"):
        result = _cli("swap", *base, "--swapper", "classic", "--face-detector-model", "scrfd")
        assert result.returncode == 2 and "antelopev2-det" in result.stderr.strip().splitlines()[-1], result.stderr
        assert not any(line.startswith(("analyze:", "swap:")) for line in result.stderr.splitlines())
    from apple_video.errors import UserError

    with pytest.raises(UserError, match="--offload and --fp8 cannot be combined"):  # refused before any file lookup
        plan_job("swap", *_options([*base, "--preset", "tiny", "--offload", "--fp8"]))
    assert not (tmp_path / "o.mp4").exists()

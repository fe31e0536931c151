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
import synth
from PIL import Image

from apple_video.engine.batch import BatchItem, output_names, read_manifest
from apple_video.engine.factories import EngineFactories, quiet_detector
from apple_video.engine.job import plan_job
from apple_video.errors import InputError, UserError
from apple_video.swappers.classic import ClassicSwapper

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

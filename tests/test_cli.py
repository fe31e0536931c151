"""The command line as a user meets it: help, version, one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXE = [sys.executable, "-c", "from cli import main; main()"]
ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_help_lists_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("swap", "preview", "weights", "train", "prepare-data", "eval"):  # DESIGN section 1
        assert command in result.stdout


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0 and "apple-video" in result.stdout


def _one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_missing_input(tmp_path: Path, source_photo: Path) -> None:
    _one_line_error(run("swap", str(source_photo), str(tmp_path / "nope.mp4"), "-o", str(tmp_path / "o.mp4")), "not found")


def test_empty_and_fake_video(tmp_path: Path, source_photo: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    _one_line_error(run("swap", str(source_photo), str(empty), "-o", str(tmp_path / "o.mp4")), "empty")
    fake = tmp_path / "fake.mp4"
    fake.write_text("this is not a video\n" * 20)
    _one_line_error(run("swap", str(source_photo), str(fake), "-o", str(tmp_path / "o.mp4")), "fake.mp4")
    assert not (tmp_path / "o.mp4").exists()


def test_output_rules(tmp_path: Path, source_photo: Path, face_clip: Path) -> None:
    exists = tmp_path / "exists.mp4"
    exists.write_bytes(b"keep me")
    _one_line_error(run("swap", str(source_photo), str(face_clip), "-o", str(exists)), "exists")
    assert exists.read_bytes() == b"keep me"
    _one_line_error(run("swap", str(source_photo), str(face_clip), "-o", str(face_clip)), "equals")
    _one_line_error(run("swap", str(source_photo), str(face_clip), "-o", str(tmp_path / "no" / "o.mp4")), "does not exist")
    _one_line_error(run("swap", str(source_photo), str(face_clip), "-o", str(tmp_path / "o.txt")), "video file")


def test_unsupported_and_usage(tmp_path: Path, source_photo: Path) -> None:
    odd = tmp_path / "data.xyz"
    odd.write_text("x")
    _one_line_error(run("swap", str(source_photo), str(odd), "-o", str(tmp_path / "o.mp4")), "unsupported")
    _one_line_error(run("swap", str(source_photo)), "Missing option '-o'")
    _one_line_error(run("swap", str(source_photo), "-o", str(tmp_path / "o.mp4")), "missing TARGET")
    _one_line_error(run("swap", "--face-selector-mode", "bogus", "a", "b", "-o", "c"), "bogus")


def test_source_without_face(tmp_path: Path, face_clip: Path) -> None:
    import numpy as np
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((200, 200, 3), 120, np.uint8)).save(blank)
    _one_line_error(run("swap", str(blank), str(face_clip), "-o", str(tmp_path / "o.mp4")), "no face")
    assert not (tmp_path / "o.mp4").exists()


def test_usage_errors_exit_2() -> None:
    _one_line_error(run("eval", "a.jpg", "b.mp4", "c.mp4"), "not found")
    _one_line_error(run("train", "teacher"), "--config")
    _one_line_error(run("train", "teacher", "--config", "nope.yaml"), "not found")
    _one_line_error(run("prepare-data", "missing_dir", "-o", "x"), "not found")


def test_weights_where_and_check(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "APPLE_VIDEO_HOME": str(tmp_path)}
    result = subprocess.run([*EXE, "weights", "where"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0 and str(tmp_path) in result.stdout and "pulid-flux-v0.9.1" in result.stdout
    result = subprocess.run([*EXE, "weights", "check"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert "missing" in result.stdout


def test_weights_download_fails_fast_offline(tmp_path: Path) -> None:
    import os
    import time

    env = {**os.environ, "APPLE_VIDEO_HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": "http://127.0.0.1:9", "APPLE_VIDEO_DOWNLOAD_BASE": "http://127.0.0.1:9"}
    start = time.time()
    result = subprocess.run([*EXE, "weights", "download", "apple-student", "--timeout", "2"], cwd=ROOT,
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2 and "cannot reach 127.0.0.1:9" in result.stderr
    assert time.time() - start < 30


def test_unreachable_ray_cluster_fails_fast(tmp_path: Path, source_photo: Path, face_clip: Path) -> None:
    import time

    start = time.time()
    _one_line_error(run("swap", str(source_photo), str(face_clip), "-o", str(tmp_path / "o.mp4"), "--ray-address",
                        "127.0.0.1:9"), "cannot reach the Ray cluster")
    assert time.time() - start < 60
    assert not list(tmp_path.iterdir())


def test_apple_swapper_without_weights_is_one_line(tmp_path: Path, source_photo: Path, face_clip: Path) -> None:
    import os

    env = {**os.environ, "APPLE_VIDEO_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf")}
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run([*EXE, "swap", str(source_photo), str(face_clip), "-o", str(out / "o.mp4"), "--swapper",
                             "apple"], cwd=ROOT, capture_output=True, text=True, env=env)
    _one_line_error(result, "flux-krea-dev")
    assert "weights where" in result.stderr
    assert not list(out.iterdir())  # no job folder, no partial output


def test_recipe_and_batch_size_options(tmp_path: Path, source_photo: Path, face_clip: Path) -> None:
    from apple_video.engine.job import batch_size_from, recipe_from

    out = str(tmp_path / "o.mp4")
    _one_line_error(run("swap", str(source_photo), str(face_clip), "-o", out, "--batch-size", "many"), "--batch-size")
    _one_line_error(run("swap", str(source_photo), str(face_clip), "-o", out, "--no-inversion", "--recipe", "inversion"),
                    "--no-inversion")
    assert not Path(out).exists()
    assert batch_size_from("auto") == "auto" and batch_size_from("8") == 8
    assert recipe_from({"recipe": None, "no_inversion": True}) == "student"  # the old flag stays an alias
    assert recipe_from({"recipe": None, "no_inversion": False}) is None  # the preset decides
    help_text = run("swap", "--help").stdout
    assert "--recipe [student|inversion]" in help_text and "--offload" in help_text

"""A user's install: a wheel built from the project (not an editable install), installed into its own folder and
run from another folder, finds its presets in the installed package and swaps with `--preset tiny`."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("pyproject.toml", "README.md", "cli.py", "apple_video", "training")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="building the wheel offline needs setuptools")
def test_wheel_installed_elsewhere_swaps_with_the_tiny_preset(tmp_path: Path, source_photo: Path, clip_frames) -> None:
    from PIL import Image

    # build from a copy: the checkout gets no build/ or egg-info, and only what a release holds goes in
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in SHIPPED:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, tree / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(tree)],
                   check=True, capture_output=True, timeout=600)
    [wheel] = (tmp_path / "dist").glob("apple_video-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True,
                   timeout=600)
    assert (site / "apple_video" / "configs" / "tiny.yaml").is_file()
    assert (site / "apple_video" / "configs" / "train" / "tiny_teacher.yaml").is_file()
    assert not (site / "tests").exists()  # test media stays out of the product

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import apple_video.config as c, cli; print(c.CONFIG_DIR); "
                            "print(cli.__file__); print(c.load_preset('tiny').name)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    config_dir, cli_file, name = where.stdout.split()
    assert Path(config_dir).is_relative_to(site) and Path(cli_file).is_relative_to(site) and name == "tiny"

    target = elsewhere / "still.png"
    Image.fromarray(clip_frames[10]).save(target)
    script = site / "bin" / "apple-video"
    assert script.is_file()
    result = subprocess.run([sys.executable, str(script), "swap", str(source_photo), "still.png", "-o", "out.png",
                             "--preset", "tiny"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "swapper: apple (preset tiny)" in result.stderr and "1 faces swapped" in result.stdout
    assert (elsewhere / "out.png").is_file()


def _lockfile(*args: str, root: Path = ROOT) -> subprocess.CompletedProcess:
    """scripts/lockfile.py as a user runs it (its ROOT is the folder above its own)."""
    return subprocess.run([sys.executable, str(root / "scripts" / "lockfile.py"), *args], capture_output=True,
                          text=True, timeout=60)


def test_the_lock_is_the_one_pyproject_gives_with_one_opencv(tmp_path: Path) -> None:
    """requirements/lock.txt: compiled from today's pyproject (its recorded input hash), every dependency of ours
    (and of the test extra) pinned inside its range with hashes, one OpenCV wheel; a changed dependency list is
    caught as stale."""
    import re
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    assert _lockfile("check").returncode == 0
    text = (ROOT / "requirements" / "lock.txt").read_text()
    pins = {canonicalize_name(name): version
            for name, version in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", text, flags=re.M)}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins and requirement.specifier.contains(pins[name], prereleases=True), (line, pins.get(name))
        entry = _lockfile("subset", requirement.name)  # what installing it alone takes: its pin with its hashes
        assert entry.returncode == 0 and f"=={pins[name]}" in entry.stdout and "--hash=sha256:" in entry.stdout, line
    assert [n for n in pins if n.startswith("opencv")] == ["opencv-python"]
    assert text.count("==") == len(pins) and text.count("--hash=sha256:") >= len(pins)

    changed = (ROOT / "pyproject.toml").read_text().replace('"click>=8.1"', '"click>=8.2"')
    assert changed != (ROOT / "pyproject.toml").read_text()
    (tmp_path / "scripts").mkdir()
    (tmp_path / "requirements").mkdir()
    shutil.copy(ROOT / "scripts" / "lockfile.py", tmp_path / "scripts")
    shutil.copy(ROOT / "requirements" / "lock.txt", tmp_path / "requirements")
    (tmp_path / "pyproject.toml").write_text(changed)
    assert _lockfile("stamp", root=tmp_path).stdout != _lockfile("stamp").stdout
    stale = _lockfile("check", root=tmp_path)
    assert stale.returncode == 1 and "is stale" in stale.stderr, stale.stderr

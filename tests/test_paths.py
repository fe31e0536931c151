"""The one temp-then-rename writer every output goes through."""

from __future__ import annotations

from pathlib import Path

import pytest

from apple_video.media.paths import atomic_write


def test_a_finished_write_replaces_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and ".partial-" in tmp.name and tmp.suffix == ".json"
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible until the block ends
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.parametrize("interruption", [OSError, KeyboardInterrupt])
def test_an_interrupted_write_keeps_the_old_file_and_removes_the_temp(tmp_path: Path, interruption) -> None:
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"old clip")
    with pytest.raises(interruption), atomic_write(target) as tmp:
        tmp.write_bytes(b"half a cl")
        raise interruption()
    assert target.read_bytes() == b"old clip"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_a_folder_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint-2"
    target.mkdir()
    (target / "state.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.mkdir()
        (tmp / "state.json").write_text("new")
        raise RuntimeError("killed while saving")
    assert (target / "state.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]
    with atomic_write(target) as tmp:
        tmp.mkdir()
        (tmp / "state.json").write_text("new")
    assert [p.name for p in target.iterdir()] == ["state.json"] and (target / "state.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]

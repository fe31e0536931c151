"""The video engine end to end (classic + tiny swappers, dlib detector, local and Ray executors)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from apple_video.engine.batch import swap_batch
from apple_video.engine.run import job_dir_for, plan_chunks, swap_folder, swap_image, swap_video
from apple_video.media.metadata import comment_of, is_synthetic_tag
from apple_video.media.video import EncodeSettings, decode_frames, probe
from apple_video.settings import SwapSettings
from tests import synth

ROOT = Path(__file__).resolve().parent.parent
LOSSLESS = EncodeSettings(codec="ffv1")


def _frames(path: Path) -> list[np.ndarray]:
    return [f.rgb for f in decode_frames(probe(path))]


def _times(path: Path) -> np.ndarray:
    info = probe(path)
    return np.array([float((p - info.pts[0]) * info.time_base) for p in info.pts])


def _audio_duration(path: Path) -> float:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        last = max(p.pts + p.duration for p in container.demux(stream) if p.pts is not None)
        return float(last * stream.time_base)


def test_plan_chunks_snaps_to_keyframes() -> None:
    assert plan_chunks(100, (0, 30, 60, 90), 25) == [(0, 30), (30, 60), (60, 90), (90, 100)]
    assert plan_chunks(10, (0,), 4) == [(0, 4), (4, 8), (8, 10)]


def test_video_swap_keeps_frames_timestamps_audio(tmp_path: Path, source_photo: Path, face_clip: Path) -> None:
    output = tmp_path / "out.mkv"
    settings = SwapSettings(swapper="classic", encode=LOSSLESS, chunk_frames=16)
    summary = swap_video([source_photo], face_clip, output, settings)
    a, b = probe(face_clip), probe(output)
    assert b.frame_count == a.frame_count == 51
    assert np.abs(_times(output) - _times(face_clip)).max() <= 0.001  # mkv stores milliseconds
    assert abs(_audio_duration(output) - _audio_duration(face_clip)) <= 1 / 15
    with av.open(str(output)) as container:
        assert is_synthetic_tag(comment_of(container.metadata))
    before, after = _frames(face_clip), _frames(output)
    assert summary.frames_passed_through >= 6
    for i in range(45, 51):  # no face: bit-exact copies
        assert np.array_equal(before[i], after[i])
    changed = sum(not np.array_equal(before[i], after[i]) for i in range(45))
    assert changed >= 40
    assert not job_dir_for(output).exists()


def test_tiny_apple_swap_on_video(tmp_path: Path, source_photo: Path, face_clip: Path) -> None:
    output = tmp_path / "tiny.mkv"
    settings = SwapSettings(swapper="apple", encode=LOSSLESS, chunk_frames=24)
    from apple_video.settings import ModelOptions

    settings = SwapSettings(**{**settings.__dict__, "model": ModelOptions(preset="tiny")})
    summary = swap_video([source_photo], face_clip, output, settings)
    assert summary.faces_swapped >= 40
    before, after = _frames(face_clip), _frames(output)
    assert all(np.array_equal(before[i], after[i]) for i in range(45, 51))
    assert sum(not np.array_equal(before[i], after[i]) for i in range(45)) >= 40


def test_batch_of_4_gives_the_frames_of_batch_1(tmp_path: Path, source_photo: Path, face_clip: Path) -> None:
    """Batching crops (and the render threads that decode, crop, paste and encode around the model) changes
    nothing in the output: the same frames as one crop per model call, on the tiny preset in float32."""
    from apple_video.settings import ModelOptions

    outputs = {}
    for batch in (1, 4):
        outputs[batch] = tmp_path / f"batch{batch}.mkv"
        settings = SwapSettings(swapper="apple", model=ModelOptions(preset="tiny", steps=2), encode=LOSSLESS,
                                chunk_frames=6, trim_end=10, batch_size=batch)
        assert swap_video([source_photo], face_clip, outputs[batch], settings).faces_swapped == 10
    one, four = _frames(outputs[1]), _frames(outputs[4])
    assert len(one) == len(four) == 10
    # batched float matmuls round differently in the last bits (latents equal within 1e-5, see test_sampling):
    # a few pixels that sit on a rounding edge may move by one grey level, nothing more
    diff = np.abs(np.stack(one).astype(int) - np.stack(four).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, ((diff > 0).mean(), diff.max())


def test_image_swap_background_untouched(tmp_path: Path, source_photo: Path, clip_frames) -> None:
    target = tmp_path / "target.png"
    rgba = np.dstack([clip_frames[10], np.full(clip_frames[10].shape[:2], 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(target)
    output = tmp_path / "out.png"
    summary = swap_image([source_photo], target, output, SwapSettings(swapper="classic"))
    assert summary.faces_swapped == 1
    out = np.asarray(Image.open(output))
    assert out.shape == rgba.shape and np.array_equal(out[..., 3], rgba[..., 3])
    # every changed pixel lies around the face (a box a sixth of the frame); the rest of the frame is bit-exact
    changed, inside = synth.changed_within_face(rgba, out)
    assert changed > 2000 and inside == 1.0
    assert is_synthetic_tag(Image.open(output).text.get("Comment"))


def test_frame_folder_names_kept(tmp_path: Path, source_photo: Path, frames_dir: Path) -> None:
    output = tmp_path / "out_frames"
    summary = swap_folder([source_photo], frames_dir, output, SwapSettings(swapper="classic", chunk_frames=5))
    names = sorted(p.name for p in frames_dir.iterdir())
    assert sorted(p.name for p in output.iterdir()) == names
    assert summary.frames == len(names) and summary.faces_swapped >= len(names) - 3
    last = f"frame{len(names)}.png"  # the clip's last frames have no face -> byte copy
    assert (output / last).read_bytes() == (frames_dir / last).read_bytes()


def test_ray_equals_local(tmp_path: Path, source_photo: Path, face_clip: Path) -> None:
    local = tmp_path / "local.mkv"
    remote = tmp_path / "ray.mkv"
    base = dict(swapper="classic", encode=LOSSLESS, chunk_frames=16)
    swap_video([source_photo], face_clip, local, SwapSettings(**base))
    summary = swap_video([source_photo], face_clip, remote, SwapSettings(**base, executor="ray", workers=2))
    assert summary.faces_swapped >= 40
    assert probe(remote).pts == probe(local).pts
    assert all(np.array_equal(a, b) for a, b in zip(_frames(local), _frames(remote), strict=True))


def test_kill_and_resume_gives_identical_output(tmp_path: Path, source_photo: Path, face_clip: Path) -> None:
    reference = tmp_path / "ref.mkv"
    swap_video([source_photo], face_clip, reference, SwapSettings(swapper="classic", encode=LOSSLESS, chunk_frames=8))
    output = tmp_path / "resumed.mkv"
    command = [sys.executable, "-c", "from cli import main; main()", "swap", str(source_photo), str(face_clip), "-o",
               str(output), "--swapper", "classic", "--output-video-encoder", "ffv1", "--chunk-frames", "8"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest = job_dir_for(output) / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if manifest.exists():
            try:
                if json.loads(manifest.read_text())["rendered"]:
                    break
            except (json.JSONDecodeError, KeyError):
                pass
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not output.exists(), "killed before the end: no output yet"
    done = json.loads(manifest.read_text())["rendered"]
    assert 0 < len(done) < 7
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "chunks resumed" in result.stdout
    assert probe(output).pts == probe(reference).pts
    assert all(np.array_equal(a, b) for a, b in zip(_frames(reference), _frames(output), strict=True))


def test_batch_reports_bad_clip(tmp_path: Path, source_photo: Path, face_clip: Path, noface_clip: Path) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    os.link(face_clip, clips / "a.mp4")
    os.link(noface_clip, clips / "b.mp4")
    (clips / "c.mp4").write_bytes(face_clip.read_bytes()[:3000])  # corrupt
    out = tmp_path / "out"
    summaries = swap_batch([source_photo], clips, out, SwapSettings(swapper="classic", allow_no_faces=True))
    status = {Path(s.input).name: s.status for s in summaries}
    assert status == {"a.mp4": "ok", "b.mp4": "ok", "c.mp4": "failed"}
    assert probe(out / "a.mp4").frame_count == 51 and probe(out / "b.mp4").frame_count == 20
    assert not (out / "c.mp4").exists()


@pytest.mark.parametrize("rotation", [90])
def test_rotated_clip_is_swapped_in_display_orientation(tmp_path: Path, source_photo: Path, clip_frames, rotation) -> None:
    from apple_video.media.video import from_display

    stored = [from_display(f, rotation) for f in clip_frames[:20]]
    clip = synth.write_clip(tmp_path / "rot.mp4", stored, fps=15, rotation=rotation)
    output = tmp_path / "rot_out.mp4"
    summary = swap_video([source_photo], clip, output, SwapSettings(swapper="classic"))
    assert summary.faces_swapped >= 18
    info = probe(output)
    assert info.rotation == rotation and (info.width, info.height) == (360, 480) and info.frame_count == 20


def test_preview_sheet(tmp_path: Path, source_photo: Path, face_clip: Path) -> None:
    output = tmp_path / "sheet.png"
    result = subprocess.run([sys.executable, "-c", "from cli import main; main()", "preview", str(source_photo),
                             str(face_clip), "-o", str(output), "--frames", "3", "--swapper", "classic"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    sheet = np.asarray(Image.open(output))
    assert sheet.shape == (3 * 360, 960, 3)
    left, right = sheet[:360, :480], sheet[:360, 480:]
    assert (left != right).any()
    assert is_synthetic_tag(Image.open(output).text.get("Comment"))


def test_trim_keeps_range_and_cuts_audio(tmp_path: Path, source_photo: Path, face_clip: Path) -> None:
    output = tmp_path / "trim.mp4"
    settings = SwapSettings(swapper="classic", trim_start=10, trim_end=40, chunk_frames=12)
    summary = swap_video([source_photo], face_clip, output, settings)
    info, src = probe(output), probe(face_clip)
    assert info.frame_count == 30 and summary.frames == 30
    assert info.pts[0] == 0 and [p - src.pts[10] for p in src.pts[10:40]] == list(info.pts)
    assert abs(_audio_duration(output) - 30 / 15) <= 2 / 15


def test_truncated_video_gives_the_frames_that_are_there(tmp_path: Path, source_photo: Path, face_clip: Path) -> None:
    """A clip cut short (a download that stopped) is swapped up to where it ends: the frames that are there, in
    order, nothing made up, exit 0."""
    import av as _av

    whole = tmp_path / "whole.mkv"  # remuxed to mkv: no frame count in its header, the file just ends
    with _av.open(str(face_clip)) as src, _av.open(str(whole), "w") as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)
    broken = tmp_path / "broken.mkv"
    broken.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    kept = probe(broken).frame_count
    assert 0 < kept < probe(whole).frame_count
    output = tmp_path / "out.mkv"
    result = subprocess.run([sys.executable, "-c", "from cli import main; main()", "swap", str(source_photo), str(broken),
                             "-o", str(output), "--swapper", "classic", "--output-video-encoder", "ffv1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and f"{kept} frames" in result.stdout
    swapped, original = _frames(output), _frames(whole)[:kept]
    assert len(swapped) == kept
    # each output frame is the swap of the input frame at its place: closest to it among the clip's first frames
    for i, frame in enumerate(swapped):
        errors = [np.abs(frame.astype(int) - o.astype(int)).mean() for o in original]
        assert int(np.argmin(errors)) == i


def test_prefetch_keeps_order_stops_early_and_reports_errors() -> None:
    import threading

    from apple_video.prefetch import prefetch

    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))
    produced = []

    def numbers():
        for i in range(1000):
            produced.append(i)
            yield i

    ahead = prefetch(numbers(), depth=1)
    assert [next(ahead) for _ in range(3)] == [0, 1, 2]
    ahead.close()  # the consumer stops: the thread stops too, a bounded distance ahead
    assert len(produced) <= 6 and not any(t.name == "prefetch" for t in threading.enumerate())

    def failing():
        yield 1
        raise ValueError("decode failed")

    with pytest.raises(ValueError, match="decode failed"):
        list(prefetch(failing()))

"""A new user's pass (issue 16): faces found by default, errors before work, one line and exit 2, nothing
written under the final name. Media is built here: a small face in a large frame, a rotated clip, a pixel-bomb
PNG header, a read-only folder, a lock held by another process, a truncated clip."""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import signal
import struct
import subprocess
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from apple_video.engine.run import lock_path_for, swap_video
from apple_video.errors import InputError
from apple_video.faces.detect import create_detector, detect_faces
from apple_video.media.images import read_image
from apple_video.media.video import probe
from apple_video.settings import DetectorSettings, SwapSettings
from tests import synth

EXE = [sys.executable, "-c", "from cli import main; main()"]
ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*EXE, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env, **kwargs)


def one_line_error(result: subprocess.CompletedProcess, fragment: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def small_face_frames(astronaut_patch: np.ndarray) -> list[np.ndarray]:
    """1280x720 frames with a ~70 px face (the face box of a 153 px patch), drifting slowly."""
    face_width = synth.ASTRONAUT_FACE_BOX[2] - synth.ASTRONAUT_FACE_BOX[0]
    side = int(round(70 * astronaut_patch.shape[1] / face_width))
    patch = np.asarray(Image.fromarray(astronaut_patch).resize((side, side), Image.LANCZOS))
    bg = synth.background(1280, 720, seed=2)
    return [synth.paste_patch(bg, patch, synth.Placement(700 + 3 * i, 300, 1.0)) for i in range(6)]


# 1. faces are found by default: small faces in a large frame, a clip whose stored picture is upright


def test_small_face_in_large_frame_found_by_default(small_face_frames: list[np.ndarray]) -> None:
    detector = create_detector(DetectorSettings(name="dlib"), announce=False)
    assert detector.detect(small_face_frames[0], embed=False) == []  # the --face-detector-size 640 pass alone misses it
    faces = detect_faces(detector, small_face_frames[0], embed=False)
    assert len(faces) == 1
    x0, y0, x1, y1 = faces[0].bbox
    assert 640 < (x0 + x1) / 2 < 760 and 250 < (y0 + y1) / 2 < 350 and 50 < x1 - x0 < 120


def test_small_face_clip_swapped_by_default(tmp_path: Path, source_photo: Path, small_face_frames) -> None:
    clip = synth.write_clip(tmp_path / "wide.mp4", small_face_frames, fps=6)
    summary = swap_video([source_photo], clip, tmp_path / "out.mp4", SwapSettings(swapper="classic"))
    assert summary.faces_swapped == len(small_face_frames)


def test_clip_filmed_upright_with_display_rotation_is_swapped(tmp_path: Path, source_photo: Path, clip_frames) -> None:
    # stored upright + rotation metadata: the face is sideways as displayed (a phone clip tagged wrongly)
    clip = synth.write_clip(tmp_path / "tagged.mp4", clip_frames[:10], fps=10, rotation=90)
    summary = swap_video([source_photo], clip, tmp_path / "out.mp4", SwapSettings(swapper="classic"))
    assert summary.faces_swapped >= 9
    assert probe(tmp_path / "out.mp4").rotation == 90


def test_zero_faces_fails_loudly_unless_allowed(tmp_path: Path, source_photo: Path, noface_clip: Path) -> None:
    output = tmp_path / "out.mp4"
    line = one_line_error(run("swap", str(source_photo), str(noface_clip), "-o", str(output)), "no face to swap")
    assert "--allow-no-faces" in line and "--face-detector" in line
    assert not output.exists()
    result = run("swap", str(source_photo), str(noface_clip), "-o", str(output), "--allow-no-faces")
    assert result.returncode == 0, result.stderr
    assert "0 faces swapped" in result.stdout and probe(output).frame_count == 20


# 2. encoder / preset / container refused before any decode


@pytest.mark.parametrize(("args", "fragment"), [
    (["--output-video-preset", "veryfsat"], "unknown --output-video-preset 'veryfsat'"),
    (["--output-video-encoder", "libx264", "-o", "{tmp}/out.webm"], ".webm files cannot hold libx264"),
    (["--output-video-encoder", "h264_nvenc"], "h264_nvenc"),
    (["--output-video-encoder", "libsvtav1"], "libsvtav1"),
    (["--face-detector-model", "yunet"], "choose one of auto, dlib, dlib-cnn, insightface"),
    (["--executor", "local", "--ray-address", "127.0.0.1:1"], "--executor local contradicts --ray-address"),
])
def test_bad_settings_refused_before_work(tmp_path: Path, source_photo: Path, face_clip: Path, args, fragment) -> None:
    if "h264_nvenc" in args and "h264_nvenc" in av.codecs_available:
        import torch

        if torch.cuda.is_available():
            pytest.skip("NVENC may work on this machine")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    output = tmp_path / "out.mp4"
    result = run("swap", str(source_photo), str(face_clip), "-o", str(output), *args)
    one_line_error(result, fragment)
    assert "swapper:" not in result.stderr  # nothing was announced or loaded
    assert not any(tmp_path.iterdir())  # no output, no job folder


# 3. pixel bomb


def _png_header_only(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
                     + chunk(b"IEND", b""))
    return path


def test_pixel_bomb_refused_from_header(tmp_path: Path, source_photo: Path) -> None:
    bomb = _png_header_only(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(InputError, match="declares 900 megapixels"):
        read_image(bomb)
    with pytest.raises(InputError, match=r"\(12000x11000\)"):
        read_image(_png_header_only(tmp_path / "wide.png", 12000, 11000))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InputError):
        read_image(bomb)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing was decoded
    result = run("swap", str(source_photo), str(bomb), "-o", str(tmp_path / "out.png"))
    one_line_error(result, "megapixel limit")
    assert "WARN" not in result.stderr and not (tmp_path / "out.png").exists()


def test_opencv_native_logging_is_silent(tmp_path: Path, source_photo: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(source_photo.read_bytes()[:0] + b"\x89PNG\r\n\x1a\n" + b"\0" * 300)
    result = run("swap", str(source_photo), str(broken), "-o", str(tmp_path / "out.png"))
    one_line_error(result, "broken.png")
    assert "[ERROR" not in result.stderr and "[ WARN" not in result.stderr  # OpenCV native lines


# 4. FaceFusion's spellings


def test_facefusion_spellings(tmp_path: Path, source_photo: Path, face_clip: Path) -> None:
    output = tmp_path / "out.mp4"
    result = run("swap", "-s", str(source_photo), "-t", str(face_clip), "-o", str(output), "--face-detector-size",
                 "640x640", "--face-detector-angles", "0", "90", "180", "270", "--trim-frame-end", "4",
                 "--face-detector-model", "dlib")
    assert result.returncode == 0, result.stderr
    assert "4 frames, 4 faces swapped" in result.stdout


def test_facefusion_detector_names_map_or_refuse() -> None:
    from apple_video.engine.job import detector_name
    from apple_video.errors import ConfigError

    assert detector_name("scrfd") == "insightface" and detector_name("retinaface") == "insightface"
    with pytest.raises(ConfigError, match="yolo_face"):
        detector_name("yolo_face")


def test_angles_do_not_hide_the_source_face(tmp_path: Path, source_photo: Path, clip_frames) -> None:
    clip = synth.write_clip(tmp_path / "c.mp4", [np.ascontiguousarray(np.rot90(f)) for f in clip_frames[:6]], fps=6)
    settings = SwapSettings(swapper="classic", detector=DetectorSettings(angles=(90, 270)))
    assert swap_video([source_photo], clip, tmp_path / "o.mp4", settings).faces_swapped >= 5


# 6. output-side OS errors


def _without_root_override() -> None:
    """Root ignores folder modes: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so the
    command run next has root's uid without them (as a normal user meets a read-only folder)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl")


def test_read_only_output_folder(tmp_path: Path, source_photo: Path, face_clip: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    as_user = _without_root_override if os.geteuid() == 0 else None
    result = run("swap", str(source_photo), str(face_clip), "-o", str(locked / "out.mp4"), preexec_fn=as_user)
    one_line_error(result, "cannot write to the folder")
    assert not any(locked.iterdir())
    result = run("swap", str(source_photo), str(source_photo), "-o", str(locked / "out.png"), preexec_fn=as_user)
    one_line_error(result, "cannot write to the folder")
    locked.chmod(0o755)


def _small_file_limit() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))


def test_disk_full_is_a_user_error_and_leaves_no_partial_files(tmp_path: Path, source_photo: Path, face_clip: Path) -> None:
    output = tmp_path / "out.mp4"
    result = run("swap", str(source_photo), str(face_clip), "-o", str(output), preexec_fn=_small_file_limit)
    one_line_error(result, "cannot write")
    assert not output.exists()
    leftovers = [p.name for p in tmp_path.rglob("*") if ".partial-" in p.name or p.name.endswith(".tmp")]
    assert leftovers == []


# 7. a second job on the same output


def test_second_job_on_same_output_refuses(tmp_path: Path, source_photo: Path, face_clip: Path) -> None:
    output = tmp_path / "out.mp4"
    holder = subprocess.Popen([sys.executable, "-c", (  # another job: the product's own lock, held a minute
        "import time\nfrom pathlib import Path\nfrom apple_video.engine.run import job_lock\n"
        f"with job_lock(Path({str(output)!r})):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        one_line_error(run("swap", str(source_photo), str(face_clip), "-o", str(output)), "another apple-video job")
        assert not output.exists()
    finally:
        holder.kill()
        holder.wait()
    with open(lock_path_for(output), "a+") as handle:  # released with its process
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


# 8. weights check


def test_weights_check_exits_1_when_files_are_missing(tmp_path: Path) -> None:
    result = subprocess.run([*EXE, "weights", "check"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "APPLE_VIDEO_HOME": str(tmp_path),
                                 "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 1 and "missing" in result.stdout


# 9. frame rate in Matroska / WebM


@pytest.mark.parametrize(("suffix", "encoder"), [(".mkv", "libx264"), (".webm", "libvpx-vp9")])
def test_mkv_webm_keep_the_frame_rate(tmp_path: Path, source_photo: Path, clip_frames, suffix, encoder) -> None:
    clip = synth.write_clip(tmp_path / "in.mp4", clip_frames[:8], fps=25)
    output = tmp_path / f"out{suffix}"
    settings = SwapSettings(swapper="classic", encode=replace(SwapSettings().encode, codec=encoder))
    swap_video([source_photo], clip, output, settings)
    with av.open(str(output)) as container:
        assert container.streams.video[0].average_rate == 25


# 10. truncated clip


def test_truncated_clip_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cut.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:  # frame index at the front
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(30):
            frame = av.VideoFrame.from_ndarray(np.random.default_rng(i).integers(0, 255, (240, 320, 3), np.uint8),
                                               format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    with caplog.at_level(logging.WARNING, logger="apple_video"):
        info = probe(path)
    assert info.frame_count < 30
    assert any("truncated" in r.getMessage() and "30 frames" in r.getMessage() for r in caplog.records)


# 11. Ray, progress, preview --help


def test_unreachable_ray_cluster_fails_before_any_clip(tmp_path: Path, source_photo: Path, face_clip: Path) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("a.mp4", "b.mp4"):
        os.link(face_clip, clips / name)
    result = run("swap", str(source_photo), str(clips), "-o", str(tmp_path / "out"), "--ray-address", "127.0.0.1:9")
    one_line_error(result, "cannot reach the Ray cluster")
    assert "a.mp4" not in result.stdout and "gcs_client" not in result.stderr


def test_ray_failure_names_the_cause() -> None:
    from apple_video.engine.executors import ray_failure

    # the lines Ray 2.60 printed joining a `RAY_AUTH_MODE=token ray start --head` cluster without the token
    seen = RuntimeError("Failed to connect to Ray cluster at 10.0.0.2:6379\ngcs_client.cc:210: Failed to get cluster ID "
                        "from GCS server: Unauthenticated: RPC error: InvalidAuthToken: Authentication token is missing")
    assert "RAY_AUTH_TOKEN" in ray_failure("h:1", seen) and "token authentication" in ray_failure("h:1", seen)
    assert "RAY_AUTH_TOKEN" in ray_failure("h:1", ConnectionError("Failed to connect to Ray cluster at 10.0.0.2"))
    assert "versions" in ray_failure("h:1", RuntimeError("Version mismatch: The cluster was started with: Ray 2.9"))


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path: Path, source_photo: Path, face_clip: Path) -> None:
    result = run("swap", str(source_photo), str(face_clip), "-o", str(tmp_path / "out.mp4"))
    assert result.returncode == 0, result.stderr
    assert "analyze: 51/51 frames" in result.stderr and "swap: 51/51 frames" in result.stderr


def test_preview_help_lists_only_what_it_uses() -> None:
    result = run("preview", "--help")
    assert result.returncode == 0
    for unused in ("--ray-address", "--chunk-frames", "--output-video-encoder", "--trim-start", "--allow-no-faces"):
        assert unused not in result.stdout
    for used in ("--frames", "--face-detector", "--swapper", "-o, --output"):
        assert used in result.stdout

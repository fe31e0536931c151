"""Issue 25: still shots stay still, crops resample cleanly, the classic swap holds on turned faces."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from apple_video.faces.align import alignment_matrix, invert, matrix_scale, transform_points, warp_crop
from apple_video.faces.detect import DetectorSettings, ScaleSearch, create_detector
from apple_video.faces.track import one_euro, smooth_zero_phase
from apple_video.media import synth
from apple_video.settings import ModelOptions, SwapSettings, TrackSettings

STILL_FRAMES = 30  # chunk of 28: frames 0, 23, 24 (the fine probe), 25, 27 of one chunk and 0, 1 of the next


@pytest.fixture(scope="module")
def detector():
    return create_detector(DetectorSettings(name="dlib"))


def test_one_euro_still_input_gives_itself_exactly() -> None:
    rng = np.random.default_rng(0)
    still = np.repeat(rng.uniform(0, 1000, (1, 68, 2)), 40, axis=0)
    assert np.array_equal(one_euro(still, 30.0, 1.0, 0.01), still)
    assert np.array_equal(smooth_zero_phase(still, 30.0, TrackSettings()), still)
    moving = still + np.linspace(0, 5, 40)[:, None, None]
    assert not np.array_equal(smooth_zero_phase(moving + rng.normal(0, 0.3, moving.shape), 30.0, TrackSettings()),
                              moving)


@pytest.mark.parametrize("scale,size", [(0.5, (480, 360)), (1.6, (480, 360)), (4.0, (1920, 1080))])
def test_landmarks_do_not_depend_on_the_detection_scale(detector, astronaut_patch, scale, size) -> None:
    """A face's landmarks are a function of the frame: whatever scale found its box, the same points."""
    frame = synth.paste_patch(synth.background(*size), astronaut_patch, synth.Placement(size[0] / 2.1, size[1] / 1.9,
                                                                                         scale))
    found = []
    for working in (detector.base_scale(frame.shape), detector.fine_scale(frame.shape), 0.7, 1.0, 1.3):
        faces = detector.detect(frame, False, working)
        if faces:
            found.append(faces[0])
    assert len(found) >= 2
    for face in found[1:]:
        assert np.array_equal(face.landmarks, found[0].landmarks)
        assert np.array_equal(face.bbox, found[0].bbox)
    search = ScaleSearch(detector)
    stream = [search.detect(i, frame, embed=False)[0].landmarks for i in range(26)]
    assert all(np.array_equal(points, found[0].landmarks) for points in stream)


def _still_folder(folder: Path, frame: np.ndarray) -> Path:
    folder.mkdir()
    for i in range(STILL_FRAMES):
        Image.fromarray(frame).save(folder / f"f{i:02d}.png")
    return folder


@pytest.mark.parametrize("swapper", ["classic", "student"])
def test_still_shot_gives_identical_outputs_across_chunks_and_probes(tmp_path: Path, source_photo: Path,
                                                                    astronaut_patch: np.ndarray, swapper: str) -> None:
    from apple_video.engine.run import swap_folder

    # a small face: the detector's scale search moves off its first scale after frame 0 and probes at frame 24
    frame = synth.paste_patch(synth.background(480, 360), astronaut_patch, synth.Placement(230, 170, 0.6))
    folder = _still_folder(tmp_path / "still", frame)
    if swapper == "classic":
        settings = SwapSettings(swapper="classic", chunk_frames=28, batch_size=3)
    else:
        settings = SwapSettings(swapper="apple", model=ModelOptions(preset="tiny", steps=1, recipe="student"),
                                chunk_frames=28, batch_size=3)
    swap_folder([source_photo], folder, tmp_path / "out", settings)
    outs = [np.asarray(Image.open(tmp_path / "out" / f"f{i:02d}.png")) for i in range(STILL_FRAMES)]
    assert not np.array_equal(outs[0], frame)
    for i, out in enumerate(outs):
        assert np.array_equal(out, outs[0]), (i, int(np.abs(out.astype(int) - outs[0]).max()))


def _high_frequency_energy(rgb: np.ndarray) -> float:
    """Spectral energy of the grey image above half its Nyquist frequency."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float64)
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(grey - grey.mean()))) ** 2
    h, w = grey.shape
    fy, fx = np.meshgrid(np.fft.fftshift(np.fft.fftfreq(h)), np.fft.fftshift(np.fft.fftfreq(w)), indexing="ij")
    return float(spectrum[np.hypot(fx, fy) > 0.25].sum())


def test_crops_are_antialiased_when_shrinking(detector, astronaut_patch) -> None:
    """A large face with a fine stripe pattern: the shrinking crop holds no more high-frequency energy (moiré)
    than an area-resampled reference; plain bilinear decimation holds far more."""
    frame = synth.paste_patch(synth.background(1920, 1080), astronaut_patch, synth.Placement(900, 540, 4.5))
    xs = np.arange(frame.shape[1])
    stripes = (40 * np.sign(np.sin(2 * np.pi * xs / 2.6)))[None, :, None]
    frame = np.clip(frame.astype(np.float64) + stripes, 0, 255).astype(np.uint8)
    face = detector.detect(frame, embed=False)[0]
    matrix = alignment_matrix(face.kps, 256)
    scale = matrix_scale(matrix)
    assert scale < 0.5
    crop = warp_crop(frame, matrix, 256)
    small = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    unscaled = matrix.copy()
    unscaled[:, :2] /= scale
    reference = cv2.warpAffine(small, unscaled, (256, 256), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    plain = cv2.warpAffine(frame, matrix, (256, 256), flags=cv2.INTER_LINEAR)
    ours, area, aliased = (_high_frequency_energy(x) for x in (crop, reference, plain))
    assert ours <= area < aliased, (ours, area, aliased)


def test_crop_replicates_the_frame_edge(detector, astronaut_patch) -> None:
    """Where the crop leaves the frame it repeats the frame's edge pixels (not a mirror image of the frame)."""
    frame = synth.paste_patch(synth.background(480, 360), astronaut_patch, synth.Placement(70, 180, 1.0))
    face = detector.detect(frame, embed=False)[0]
    matrix = alignment_matrix(face.kps, 256)
    crop = warp_crop(frame, matrix, 256)
    ys, xs = np.mgrid[0:256, 0:256]
    where = transform_points(np.stack([xs.ravel(), ys.ravel()], 1), invert(matrix)).reshape(256, 256, 2)
    outside = where[..., 0] < -2
    assert outside.sum() > 500
    rows = np.clip(np.round(where[..., 1][outside]).astype(int), 0, frame.shape[0] - 1)
    edge = frame[rows, 0].astype(int)
    assert np.abs(crop[outside].astype(int) - edge).mean() < 12  # the edge column, up to the row's sub-pixel blend


def test_source_photos_are_presized_like_the_official_inference(detector, hopper) -> None:
    from apple_video.faces.sources import SOURCE_MAX_SIDE, source_faces

    big = np.asarray(Image.fromarray(hopper).resize((hopper.shape[1] * 3, hopper.shape[0] * 3), Image.BICUBIC))
    source = source_faces([big], ["big"], detector, 256)[0]
    assert max(source.image.shape[:2]) == SOURCE_MAX_SIDE
    assert source.face.bbox[2] <= SOURCE_MAX_SIDE  # detected on the presized photo
    small = source_faces([hopper], ["hopper"], detector, 256)[0]
    assert small.image is hopper  # already small enough: untouched

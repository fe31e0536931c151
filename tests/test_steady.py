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
from apple_video.settings import ModelOptions, SwapSettings, TrackSettings
from tests import heldout, synth, talking

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


BLUE, YELLOW = (40, 90, 230), (240, 220, 30)


@pytest.fixture(scope="module")
def backdrop_sources(detector, hopper):
    """The same source face on a blue and on a yellow backdrop painted up to its silhouette (same landmarks)."""
    from apple_video.faces.sources import source_faces
    from apple_video.faces.types import SourceFace

    landmarks = detector.detect(hopper)[0].landmarks
    blue, yellow = (talking.on_backdrop(hopper, landmarks, colour) for colour in (BLUE, YELLOW))
    source = source_faces([blue], ["blue"], detector, 256)[0]
    matrix = alignment_matrix(source.face.kps, 256)
    return source, SourceFace(yellow, source.face, warp_crop(yellow, matrix, 256), source.landmarks)


@pytest.mark.parametrize("degrees", [0, 30, 45])
def test_turned_face_takes_nothing_from_the_source_backdrop(detector, astronaut, backdrop_sources, degrees) -> None:
    """Swapping with the source on a blue or on a yellow backdrop gives the same face, frontal or turned (measured:
    at most 2 grey levels apart on under 1% of the crop, from the skin test along the silhouette; a mask that let
    the backdrop in differs by 80+ levels on a third of it)."""
    from apple_video.swappers.base import CropJob
    from apple_video.swappers.classic import ClassicSwapper

    target = talking.turned(astronaut, detector.detect(astronaut)[0].landmarks, degrees)
    face = detector.detect(target)[0]
    outs = []
    for source in backdrop_sources:
        swapper = ClassicSwapper()
        swapper.prepare([source])
        matrix = swapper.crop_matrix(face.kps, face.landmarks)
        crop = warp_crop(target, matrix, swapper.crop_size)
        out = swapper.swap_one(CropJob(crop, transform_points(face.landmarks, matrix), 0))
        outs.append(out.astype(int))
    assert np.abs(outs[0] - crop).mean(2).mean() > 1.0  # it did swap
    difference = np.abs(outs[0] - outs[1]).max(2)
    assert difference.max() <= 3 and (difference > 0).mean() < 0.02, (difference.max(), (difference > 0).mean())


@pytest.mark.parametrize("degrees", [30, 45])
def test_turned_face_swap(tmp_path: Path, detector, astronaut, hopper, degrees) -> None:
    """A turned target swapped with a source on a vivid backdrop: no face pixel takes the backdrop's colour, the
    seam is as quiet as on frontal faces, and the far side changes less than the near side (the target's own skin)."""
    from apple_video.engine.run import swap_image
    from tests.test_classic import seam_score

    Image.fromarray(talking.on_backdrop(hopper, detector.detect(hopper)[0].landmarks, BLUE)).save(tmp_path / "s.png")
    target = talking.turned(astronaut, detector.detect(astronaut)[0].landmarks, degrees)
    Image.fromarray(target).save(tmp_path / "t.png")
    swap_image([tmp_path / "s.png"], tmp_path / "t.png", tmp_path / "o.png", SwapSettings(swapper="classic"))
    out = np.asarray(Image.open(tmp_path / "o.png").convert("RGB"))
    lm = detector.detect(target)[0].landmarks
    face = np.zeros(target.shape[:2], np.uint8)
    cv2.fillPoly(face, [cv2.convexHull(lm.astype(np.float32)).astype(np.int32)], 1)
    face = face > 0

    def lab(rgb: np.ndarray) -> np.ndarray:
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)

    blue = lab(np.uint8([[BLUE]]))[0, 0]
    bluish = (np.linalg.norm(lab(out) - blue, axis=2) < 50) & (np.linalg.norm(lab(target) - blue, axis=2) >= 50)
    assert not (bluish & face).any()
    assert seam_score(target, out) <= 1.5
    change = np.abs(out.astype(np.float32) - target).mean(2)
    columns = np.arange(target.shape[1])[None, :]
    near, far = face & (columns < lm[36:42, 0].mean()), face & (columns > lm[42:48, 0].mean())
    assert change[far].mean() < change[near].mean(), (change[far].mean(), change[near].mean())


@pytest.fixture(scope="module")
def talking_swaps(tmp_path_factory, source_photo: Path, astronaut_patch: np.ndarray, detector):
    """The classic swap of three generated talking clips (face sizes ~80/135/215 px, fast/slow/irregular speech,
    a still, a swaying and a nodding head), with `apple-video eval`'s metrics."""
    from apple_video.engine.run import swap_video
    from apple_video.evaluate.clip import evaluate_clip
    from apple_video.settings import EvalSettings

    folder = tmp_path_factory.mktemp("talks")
    landmarks = detector.detect(astronaut_patch)[0].landmarks
    results = {}
    for talk in talking.TALKS:
        clip = talking.write_talk(folder, astronaut_patch, landmarks, talk)
        output = folder / f"{talk.name}-swapped.mp4"
        swap_video([source_photo], clip, output, SwapSettings(swapper="classic"))
        results[talk.name] = evaluate_clip(source_photo, clip, output, EvalSettings(identity_model="dlib"))
    return results


def test_classic_flicker_on_talking_clips_in_general(talking_swaps) -> None:
    """Motion-compensated face flicker (eval's DIS-flow metric) at most 1.5x the input's on every clip (measured
    1.02, 1.25, 0.96; 1.04, 1.56, 1.09 with the One-Euro beta at 0.01), identity kept: 90% of the sampled frames
    closer to the source over the three (14/15 measured; the ~80 px face alone 4/5)."""
    for name, report in talking_swaps.items():
        assert report.metrics["flicker_ratio"] <= 1.5, (name, report.metrics["flicker_ratio"])
        # a count over 5 sampled frames: >= 0.8 allows one miss per clip (the ~80 px face has one); the 90% over all
        # 15 below is the identity guard
        assert report.metrics["id_closer_to_source"] >= 0.8, (name, report.metrics["id_closer_to_source"])
    frames = {name: sum(v is not None for v in r.series["id_similarity"]) for name, r in talking_swaps.items()}
    closer = sum(r.metrics["id_closer_to_source"] * frames[name] for name, r in talking_swaps.items())
    assert closer / sum(frames.values()) >= 0.9, (closer, frames)


@pytest.fixture(scope="module")
def held_out_swaps(tmp_path_factory, source_photo: Path, astronaut: np.ndarray, astronaut_patch: np.ndarray,
                   hopper: np.ndarray, detector):
    """The classic swap of the held-out clips (heldout.py: faces, sizes and seeds the tuning never used), with
    `apple-video eval`'s metrics. Grace Hopper's face as a target gets the astronaut as its source."""
    from apple_video.engine.run import swap_video
    from apple_video.evaluate.clip import evaluate_clip
    from apple_video.settings import EvalSettings
    from tests.conftest import HOPPER_FACE_BOX

    folder = tmp_path_factory.mktemp("held-out")
    astronaut_photo = folder / "astronaut.jpg"
    Image.fromarray(astronaut).save(astronaut_photo, quality=92)
    patches = {"astronaut": astronaut_patch, "hopper": synth.face_patch(hopper, HOPPER_FACE_BOX)}
    results = {}
    for case in heldout.HELD_OUT:
        clip = heldout.write_held_out(folder, patches[case.photo], detector, case)
        source = astronaut_photo if case.photo == "hopper" else source_photo
        output = folder / f"{case.name}-swapped.mp4"
        swap_video([source], clip, output, SwapSettings(swapper="classic"))
        results[case.name] = evaluate_clip(source, clip, output, EvalSettings(identity_model="dlib"))
    return results


def test_classic_flicker_on_held_out_clips(held_out_swaps) -> None:
    """Issue 36: on clips the tuning never saw (other faces, 60-250 px, noise from none to heavy, a lighting change,
    a cut) the face flicker stays at most 1.5x the input's on every clip (measured 0.76, 1.08, 0.76, 1.07, 1.00,
    1.07), and the identity still moves to the source: 3 of the 4 sampled frames at least on each clip, 90% over
    all (23/24 measured)."""
    for name, report in held_out_swaps.items():
        assert report.metrics["flicker_ratio"] <= 1.5, (name, report.metrics["flicker_ratio"])
        assert report.metrics["id_closer_to_source"] >= 0.75, (name, report.metrics["id_closer_to_source"])
    frames = {name: sum(v is not None for v in r.series["id_similarity"]) for name, r in held_out_swaps.items()}
    closer = sum(r.metrics["id_closer_to_source"] * frames[name] for name, r in held_out_swaps.items())
    assert closer / sum(frames.values()) >= 0.9, (closer, frames)

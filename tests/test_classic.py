"""The classic swapper makes a real swap: output faces move toward the source identity."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from apple_video.engine.run import swap_video
from apple_video.faces.detect import DetectorSettings, create_detector
from apple_video.faces.mask import face_height
from apple_video.media.video import decode_frames, probe
from apple_video.settings import SwapSettings
from apple_video.swappers.base import CropJob
from apple_video.swappers.classic import ClassicSwapper, triangle_affines
from apple_video.swappers.classic_masks import mouth_interior_mask
from tests import synth
from tests.talking import jaw_rig, open_jaw

FLICKER_BOUND = 1.2  # issue 17; measured: eval (DIS) flicker 1.18 (1.99 before), frame difference 1.01 (1.14)
# A product goal, not a noise bound, so its margin (~2%) is kept small on purpose: the swap is deterministic for one
# install (the lock pins every resampler), and a change that moves it past 1.2 is a regression to look at.


def test_identity_moves_to_source(tmp_path: Path, source_photo: Path, face_clip: Path, hopper: np.ndarray) -> None:
    output = tmp_path / "out.mp4"
    summary = swap_video([source_photo], face_clip, output, SwapSettings(swapper="classic"))
    assert summary.faces_swapped >= 40
    detector = create_detector(DetectorSettings(name="dlib"))
    source = detector.detect(hopper)[0].embedding
    before = {f.index: f.rgb for f in decode_frames(probe(face_clip))}
    closer, total = 0, 0
    for frame in decode_frames(probe(output)):
        original = detector.detect(before[frame.index])
        if not original:
            continue
        swapped = detector.detect(frame.rgb)
        total += 1
        if swapped:
            emb = swapped[0].embedding
            closer += np.linalg.norm(emb - source) < np.linalg.norm(emb - original[0].embedding)
    assert total >= 40
    assert closer / total >= 0.9, (closer, total)


def test_folding_warp_is_skipped(source_photo: Path, hopper: np.ndarray) -> None:
    from apple_video.faces.sources import source_faces

    swapper = ClassicSwapper()
    detector = create_detector(DetectorSettings(name="dlib"))
    swapper.prepare(source_faces([hopper], ["hopper"], detector, swapper.crop_size))
    crop = np.zeros((256, 256, 3), np.uint8)
    mirrored = swapper._source.landmarks.copy()
    mirrored[:, 0] = 255 - mirrored[:, 0]  # a mirror image folds every triangle
    assert swapper.swap([CropJob(crop, mirrored, 0), CropJob(crop, None, 0)]) == [None, None]


def test_poisson_blend_changes_the_face_only(tmp_path: Path, source_photo: Path, clip_frames) -> None:
    from PIL import Image

    from apple_video.engine.run import swap_image

    target = tmp_path / "t.png"
    Image.fromarray(clip_frames[20]).save(target)
    outs = {}
    for blend in ("feather", "poisson"):
        swap_image([source_photo], target, tmp_path / f"{blend}.png", SwapSettings(swapper="classic", classic_blend=blend))
        outs[blend] = np.asarray(Image.open(tmp_path / f"{blend}.png"))
    changed, inside = synth.changed_within_face(clip_frames[20], outs["poisson"])
    assert changed > 1000 and not np.array_equal(outs["poisson"], outs["feather"])
    assert inside == 1.0  # still only around the face


# --- seams, mouth and temporal stability (issue 17) -------------------------------------------------------------


def seam_score(before: np.ndarray, after: np.ndarray) -> float:
    """Mean absolute gradient across the boundary of the changed region (along its normal), output over input:
    1 = the edge of the swap adds no step, a band or a glow raises it."""
    changed = (np.abs(after.astype(np.int16) - before.astype(np.int16)).sum(2) > 20).astype(np.uint8)
    changed = cv2.morphologyEx(changed, cv2.MORPH_CLOSE, np.ones((9, 9), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(changed)
    region = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    band = (cv2.dilate(region, kernel) > 0) & (cv2.erode(region, kernel) == 0)
    smooth = cv2.GaussianBlur(region.astype(np.float32), (0, 0), 4.0)
    nx, ny = cv2.Sobel(smooth, cv2.CV_32F, 1, 0), cv2.Sobel(smooth, cv2.CV_32F, 0, 1)
    norm = np.hypot(nx, ny) + 1e-6

    def across(rgb: np.ndarray) -> float:
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
        gx, gy = cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1)
        return float(np.abs((gx * nx + gy * ny) / norm)[band].mean())

    return across(after) / across(before)


def region_flicker(before: list[np.ndarray], after: list[np.ndarray], region: np.ndarray) -> float:
    """Mean frame-to-frame difference inside `region`, output over input (1 = as steady as the input)."""
    def diff(frames: list[np.ndarray]) -> float:
        return float(np.mean([np.abs(frames[i + 1].astype(np.float32) - frames[i])[region].mean()
                              for i in range(len(frames) - 1)]))

    return diff(after) / diff(before)


def talking_frames(face: np.ndarray, detector, count: int = 36, open_px: float = 9.0) -> tuple[list[np.ndarray], np.ndarray]:
    """A still head whose jaw and lower lip open and close every 12 frames (piecewise-affine warp of a photo)."""
    lm = detector.detect(face)[0].landmarks
    rig = jaw_rig(lm, face.shape[1], face.shape[0])
    return [open_jaw(face, rig, open_px, 0.5 * (1 - np.cos(2 * np.pi * t / 12))) for t in range(count)], lm


@pytest.fixture(scope="module")
def smiling_target(astronaut_patch: np.ndarray) -> np.ndarray:
    """The astronaut's open smile (teeth showing), large enough to look at."""
    return synth.paste_patch(synth.background(480, 360), astronaut_patch, synth.Placement(240, 180, 1.6))


@pytest.fixture(scope="module")
def smiling_swap(tmp_path_factory, source_photo: Path, smiling_target: np.ndarray) -> np.ndarray:
    from apple_video.engine.run import swap_image

    folder = tmp_path_factory.mktemp("smile")
    Image.fromarray(smiling_target).save(folder / "t.png")
    swap_image([source_photo], folder / "t.png", folder / "o.png", SwapSettings(swapper="classic"))
    return np.asarray(Image.open(folder / "o.png").convert("RGB"))


def test_open_mouth_interior_is_the_targets(smiling_target: np.ndarray, smiling_swap: np.ndarray) -> None:
    detector = create_detector(DetectorSettings(name="dlib"))
    lm = detector.detect(smiling_target)[0].landmarks
    mouth = mouth_interior_mask(lm, max(smiling_target.shape))[: smiling_target.shape[0], : smiling_target.shape[1]]
    inside = cv2.erode(mouth, np.ones((3, 3), np.uint8)) > 0
    assert inside.sum() >= 40  # the smile is open: teeth between the inner lips
    diff = np.abs(smiling_swap.astype(np.int16) - smiling_target.astype(np.int16)).mean(2)
    cheeks = np.zeros_like(mouth)
    cv2.fillPoly(cheeks, [np.round(lm[[1, 2, 3, 31, 39]]).astype(np.int32)], 1)
    assert diff[cheeks > 0].mean() > 8  # the face did change...
    assert diff[inside].mean() < 4, diff[inside].mean()  # ...but the teeth are the target's, not source colour


def test_no_seam_at_the_mask_edge(smiling_target: np.ndarray, smiling_swap: np.ndarray) -> None:
    assert seam_score(smiling_target, smiling_swap) <= 1.5


@pytest.mark.parametrize("mode", ["grey", "deep", "alpha"])
def test_grey_16bit_alpha_sources(tmp_path: Path, hopper: np.ndarray, smiling_target: np.ndarray,
                                  smiling_swap: np.ndarray, mode: str) -> None:
    from apple_video.engine.run import swap_image

    grey = cv2.cvtColor(hopper, cv2.COLOR_RGB2GRAY)
    if mode == "grey":
        Image.fromarray(grey).save(tmp_path / "s.png")
    elif mode == "deep":
        cv2.imwrite(str(tmp_path / "s.png"), grey.astype(np.uint16) * 257)
    else:
        Image.fromarray(np.dstack([hopper, np.full(grey.shape, 200, np.uint8)])).save(tmp_path / "s.png")
    Image.fromarray(smiling_target).save(tmp_path / "t.png")
    swap_image([tmp_path / "s.png"], tmp_path / "t.png", tmp_path / "o.png", SwapSettings(swapper="classic"))
    out = np.asarray(Image.open(tmp_path / "o.png").convert("RGB"))
    # colour comes from the target: a grey source gives the same skin tone as a colour one, no patch anywhere
    face = np.abs(smiling_swap.astype(np.int16) - smiling_target.astype(np.int16)).sum(2) > 6
    tone = out[face].astype(np.float32).mean(0) - smiling_swap[face].astype(np.float32).mean(0)
    assert np.abs(tone).max() < 6, tone
    assert seam_score(smiling_target, out) <= 1.5


def test_still_frames_give_identical_outputs(tmp_path: Path, source_photo: Path, clip_frames) -> None:
    from apple_video.engine.run import swap_folder

    folder, output = tmp_path / "still", tmp_path / "out"
    folder.mkdir()
    for i in range(7):
        Image.fromarray(clip_frames[20]).save(folder / f"f{i}.png")
    swap_folder([source_photo], folder, output, SwapSettings(swapper="classic", chunk_frames=3, batch_size=2))
    outs = [np.asarray(Image.open(output / f"f{i}.png")) for i in range(7)]
    assert not np.array_equal(outs[0], clip_frames[20])
    for out in outs[1:]:
        assert np.array_equal(out, outs[0])


@pytest.fixture(scope="module")
def talking_swap(tmp_path_factory, source_photo: Path, astronaut_patch: np.ndarray) -> tuple[Path, Path, np.ndarray]:
    """(talking clip, its classic swap, the still's landmarks)."""
    folder = tmp_path_factory.mktemp("talk")
    detector = create_detector(DetectorSettings(name="dlib"))
    still = synth.paste_patch(synth.background(480, 360), astronaut_patch, synth.Placement(240, 180, 1.6))
    frames, lm = talking_frames(still, detector)
    clip = synth.write_clip(folder / "talk.mp4", frames, fps=15)
    swap_video([source_photo], clip, folder / "out.mp4", SwapSettings(swapper="classic", chunk_frames=16))
    return clip, folder / "out.mp4", lm


def test_talking_clip_is_as_steady_as_the_input(talking_swap: tuple[Path, Path, np.ndarray]) -> None:
    clip, output, lm = talking_swap
    before = [f.rgb for f in decode_frames(probe(clip))]
    after = [f.rgb for f in decode_frames(probe(output))]
    region = np.zeros(before[0].shape[:2], np.uint8)
    cv2.fillPoly(region, [cv2.convexHull(lm.astype(np.float32)).astype(np.int32)], 1)
    region = cv2.dilate(region, np.ones((21, 21), np.uint8)) > 0
    assert region_flicker(before, after, region) <= FLICKER_BOUND


def test_talking_clip_eval_flicker(source_photo: Path, talking_swap: tuple[Path, Path, np.ndarray]) -> None:
    """The flicker ratio `apple-video eval` reports (DIS-flow-warped face residual, swap over input)."""
    from apple_video.evaluate.clip import evaluate_clip
    from apple_video.settings import EvalSettings

    clip, output, _ = talking_swap
    metrics = evaluate_clip(source_photo, clip, output, EvalSettings(identity_model="dlib")).metrics
    assert metrics["id_closer_to_source"] >= 0.9
    assert metrics["flicker_ratio"] <= FLICKER_BOUND, metrics["flicker_ratio"]


def forehead_change(before: np.ndarray, after: np.ndarray, landmarks: np.ndarray) -> float:
    """Mean absolute grey-level change in the band between the brows and the top of the usual face mask (0.25
    face height above them): where a source's hat, hair or brow edge shows as a band over the target's hairline."""
    lift = face_height(landmarks) * 0.25
    band = np.zeros(before.shape[:2], np.uint8)
    cv2.fillPoly(band, [np.round(np.concatenate([landmarks[17:27], (landmarks[17:27] - lift)[::-1]])).astype(np.int32)], 1)
    grey = [cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float32) for x in (before, after)]
    return float(np.abs(grey[0] - grey[1])[band > 0].mean())


def test_no_dark_band_under_the_hairline(smiling_target: np.ndarray, smiling_swap: np.ndarray) -> None:
    lm = create_detector(DetectorSettings(name="dlib")).detect(smiling_target)[0].landmarks
    assert forehead_change(smiling_target, smiling_swap, lm) < 10  # 41 when the source hat was warped in


def test_chunking_never_changes_a_frame(tmp_path: Path, source_photo: Path, clip_frames) -> None:
    from apple_video.engine.run import swap_folder

    folder = tmp_path / "moving"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(clip_frames[10 + i]).save(folder / f"f{i}.png")
    runs = {}
    for chunk, batch in ((3, 1), (96, 4)):
        output = tmp_path / f"out{chunk}"
        swap_folder([source_photo], folder, output, SwapSettings(swapper="classic", chunk_frames=chunk, batch_size=batch))
        runs[chunk] = [np.asarray(Image.open(output / f"f{i}.png")) for i in range(8)]
    for a, b in zip(runs[3], runs[96], strict=True):
        assert np.array_equal(a, b)


def test_several_source_photos_say_which_one_serves(source_photo: Path, hopper: np.ndarray,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Issue 36: the classic swapper uses one photo; with several it says so, and which, in one line."""
    from apple_video.faces.sources import source_faces

    detector = create_detector(DetectorSettings(name="dlib"))
    sources = source_faces([hopper, hopper[:, ::-1].copy()], ["a", "b"], detector, 256)
    with caplog.at_level(logging.INFO, logger="apple_video.swappers.classic"):
        ClassicSwapper().prepare(sources[:1])
        assert not caplog.records
        ClassicSwapper().prepare(sources)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["classic swapper: uses one source photo, number 1 of 2 (the first with 68 landmarks); the "
                     "others are not used"], lines


def test_flat_target_triangles_still_get_a_map() -> None:
    """Landmarks that fall on one line (a face seen edge-on, a squashed jaw) make zero-area target triangles: the
    batched affine solve takes them apart instead of failing the whole swap (it raised 'Singular matrix')."""
    src = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [5.0, 5.0], [20.0, 20.0]])
    dst = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [5.0, 0.0], [20.0, 0.0]])  # 0, 1, 3, 4 on one line
    triangles = np.array([[0, 1, 2], [0, 1, 3], [1, 3, 4]])
    affines = triangle_affines(src, dst, triangles)
    assert np.isfinite(affines).all()
    corners = np.concatenate([dst[triangles[0]], np.ones((3, 1))], axis=1)
    np.testing.assert_allclose(corners @ affines[0].T, src[triangles[0]], atol=1e-9)  # a proper triangle: exact

"""The classic swapper makes a real swap: output faces move toward the source identity."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from apple_video.engine.run import swap_video
from apple_video.faces.detect import DetectorSettings, create_detector
from apple_video.media.video import decode_frames, probe
from apple_video.settings import SwapSettings
from apple_video.swappers.base import CropJob
from apple_video.swappers.classic import ClassicSwapper


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
    changed = (outs["poisson"] != clip_frames[20]).any(axis=2)
    ys, xs = np.nonzero(changed)
    assert changed.sum() > 1000 and not np.array_equal(outs["poisson"], outs["feather"])
    assert xs.min() > 100 and xs.max() < 400  # still only around the face

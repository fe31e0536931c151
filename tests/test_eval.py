"""`apple-video eval` on real media: the metrics respond to what changed and to nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from apple_video.engine.run import swap_image
from apple_video.evaluate.metrics import evaluate, expression_distance, head_pose
from apple_video.settings import SwapSettings


def test_identical_media_score_as_untouched(source_photo: Path, face_clip: Path) -> None:
    m = evaluate(source_photo, face_clip, face_clip)
    assert m.frames == 51 and m.frames_compared == 45
    assert m.pose_error_deg == 0 and m.expression_error_pct < 1e-9 and m.jitter_ratio == 1.0
    assert m.id_closer_to_source == 0 and m.background_psnr_db == 99.0


def test_a_swap_moves_identity_and_keeps_pose(tmp_path: Path, source_photo: Path, clip_frames) -> None:
    target = tmp_path / "t.png"
    Image.fromarray(clip_frames[20]).save(target)
    swap_image([source_photo], target, tmp_path / "o.png", SwapSettings(swapper="classic"))
    m = evaluate(source_photo, target, tmp_path / "o.png")
    assert m.id_closer_to_source == 1.0 and m.pose_error_deg < 10 and m.background_psnr_db > 40


def test_pose_and_expression_helpers(astronaut) -> None:
    from apple_video.faces.detect import DetectorSettings, create_detector

    face = create_detector(DetectorSettings(name="dlib")).detect(astronaut)[0]
    pose = head_pose(face.landmarks, astronaut.shape[:2])
    assert np.all(np.abs(pose) < 30)  # a frontal portrait
    assert expression_distance(face.landmarks, face.landmarks) < 1e-9
    opened = face.landmarks.copy()
    opened[57] += (0, 8)  # lower lip down
    assert expression_distance(face.landmarks, opened) > 0

"""The teacher condition (`blur_landmark_iris`) against a reference built from the official drawing rules."""

from __future__ import annotations

import numpy as np
import pytest

from apple_video.faces.align import alignment_matrix, transform_points, warp_crop
from apple_video.faces.detect import DetectorSettings, create_detector
from training.deblur import (
    downsample_blur,
    hull_labels,
    irises_from_eyes,
    teacher_condition,
)


@pytest.fixture(scope="module")
def face_512(astronaut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A real aligned 512 face crop and its dlib 68 landmarks in crop space."""
    face = create_detector(DetectorSettings(name="dlib")).detect(astronaut)[0]
    matrix = alignment_matrix(face.kps, 512)
    return warp_crop(astronaut, matrix, 512), transform_points(face.landmarks, matrix)


def _parsing(landmarks: np.ndarray) -> np.ndarray:
    """A parsing map with the classes the rule distinguishes: hair (17) above, skin (1) in the hull, glasses (6)
    over the image-left eye, neck (14) below."""
    labels = np.zeros((512, 512), np.uint8)
    labels[:120] = 17
    labels[hull_labels(landmarks, 512) > 0] = 1
    eyes_y = int(landmarks[36:48, 1].mean())
    labels[eyes_y - 18 : eyes_y + 18, int(landmarks[36, 0]) - 10 : int(landmarks[39, 0]) + 6] = 6
    labels[470:] = 14
    return labels


def _within(points: np.ndarray, radius: float, metric: str) -> np.ndarray:
    yy, xx = np.mgrid[:512, :512]
    near = np.zeros((512, 512), bool)
    for x, y in points:
        dx, dy = np.abs(xx - x), np.abs(yy - y)
        near |= (np.maximum(dx, dy) if metric == "chebyshev" else np.hypot(dx, dy)) <= radius
    return near


def test_condition_matches_the_official_drawing_rules(face_512) -> None:
    image, landmarks = face_512
    labels = _parsing(landmarks)
    out = teacher_condition(image, landmarks, labels)
    irises = irises_from_eyes(landmarks)

    # Official rules at 512: landmark discs of radius 2 drawn with thickness 4 at int() coordinates (so every
    # pixel within ~3 px is white and none beyond ~5 px); iris dots of radius 2 at rint() coordinates, red.
    lm_centres = np.floor(landmarks)
    iris_centres = np.rint(irises)
    white_core = _within(lm_centres, 3.0, "euclid")
    white_reach = _within(lm_centres, 5.0, "euclid")
    red_reach = _within(iris_centres, 2.0, "chebyshev")
    red = np.all(out == (255, 0, 0), axis=-1)
    glasses = labels == 6
    cx, cy = iris_centres[:, 0].astype(int), iris_centres[:, 1].astype(int)
    assert red[cy[5:], cx[5:]].all()  # the eye without glasses
    assert glasses[cy[:5], cx[:5]].all()  # under glasses the red is tinted: 0.9 * red + 0.1 * magenta
    assert np.abs(out[cy[:5], cx[:5]].astype(int) - (255, 0, 26)).max() <= 1
    assert not (red & ~red_reach).any()
    white = np.all(out == 255, axis=-1)
    assert white[white_core & ~red_reach & ~glasses].all()
    drawn = (white | red) & ~glasses
    assert not (white & ~white_reach & ~glasses & (image.min(-1) < 255)).any()

    # Blur only inside the parsing classes (skin and glasses here; hair, neck and background untouched).
    blurred = downsample_blur(image, 8)
    region = np.isin(labels, (1, 6))
    plain = ~white_reach & ~red_reach
    assert np.array_equal(out[~region & plain], image[~region & plain])
    assert np.array_equal(out[region & ~glasses & plain], blurred[region & ~glasses & plain])
    # Glasses: 0.9 * condition + 0.1 * magenta.
    tint = np.clip(np.round(0.9 * blurred.astype(float) + 0.1 * np.array([255, 0, 255])), 0, 255)
    diff = np.abs(out[glasses & plain].astype(float) - tint[glasses & plain])
    assert diff.max() <= 1
    assert drawn.sum() > 68 * 20  # every landmark drawn


def test_condition_without_parsing_uses_the_hull(face_512) -> None:
    image, landmarks = face_512
    out = teacher_condition(image, landmarks, None)
    hull = hull_labels(landmarks, 512) > 0
    plain = ~_within(np.floor(landmarks), 5.0, "euclid") & ~_within(np.rint(irises_from_eyes(landmarks)), 2.0, "chebyshev")
    assert np.array_equal(out[~hull & plain], image[~hull & plain])
    assert np.array_equal(out[hull & plain], downsample_blur(image, 8)[hull & plain])


def test_irises_sit_inside_the_eyes(face_512) -> None:
    _, landmarks = face_512
    irises = irises_from_eyes(landmarks)
    assert irises.shape == (10, 2)
    for eye, centre in ((landmarks[36:42], irises[0]), (landmarks[42:48], irises[5])):
        assert eye[:, 0].min() < centre[0] < eye[:, 0].max() and eye[:, 1].min() - 2 < centre[1] < eye[:, 1].max() + 2
    with pytest.raises(ValueError, match="68-point"):
        irises_from_eyes(np.zeros((5, 2)))

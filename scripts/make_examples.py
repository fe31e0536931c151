"""Rebuild the bundled example (examples/source.jpg, examples/clip.mp4) from photos shipped by packages:
matplotlib's grace_hopper.jpg (US Navy photo, public domain) and scikit-image's astronaut (NASA, public domain)."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.cbook
import numpy as np
import skimage.data
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import synth  # noqa: E402 - the test media helpers, from the checkout


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "examples"
    out.mkdir(exist_ok=True)
    hopper = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    hopper.resize((256, 300), Image.LANCZOS).save(out / "source.jpg", quality=90)
    patch = synth.face_patch(skimage.data.astronaut(), synth.ASTRONAUT_FACE_BOX)
    frames = synth.face_frames(patch, (480, 360), synth.smooth_path(45, 480, 360, patch.shape[1]))
    frames += [synth.background(480, 360)] * 6  # a few frames with no face: they must pass through untouched
    synth.write_clip(out / "clip.mp4", [np.ascontiguousarray(f) for f in frames], fps=15, crf=26)


if __name__ == "__main__":
    main()

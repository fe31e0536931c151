"""The two APPLE recipes on one face track, with the tiny preset (random weights: sampler behaviour, not quality).

A moving, scaling real face (the astronaut photo) over a textured background; dlib finds the face in each frame
and the crops are aligned as the engine aligns them. For each recipe:
- follows the target: mean |z_out(t) - z_out(t-1)| over mean |z_in(t) - z_in(t-1)| on the latents: how much the
  output changes from frame to frame for each unit the target's aligned crop changes (1: as much as the target,
  0: a frozen face; what a trained model should keep from frame to frame is the target's pose and expression);
- reconstruction: mean |z_out - z_in| / mean |z_in| when the source id is the null id, i.e. what the loop does
  to a face when nothing asks it to change (0: the target comes back). Latents, not pixels: the tiny VAE's
  random weights do not reconstruct anything;
- steps: model calls per face-frame.

    python -m benchmarks.recipes [frames] [steps]
"""

from __future__ import annotations

import sys

import numpy as np
import skimage.data
import torch

from apple_video.config import load_preset, with_overrides
from apple_video.engine.render import track_seed
from apple_video.faces.align import alignment_matrix, warp_crop
from apple_video.faces.detect import create_detector
from apple_video.models import latents as L
from apple_video.models.pipeline import ApplePipeline
from apple_video.settings import DetectorSettings
from tests import synth


def track_crops(frames: int, size: int) -> np.ndarray:
    patch = synth.face_patch(skimage.data.astronaut(), synth.ASTRONAUT_FACE_BOX)
    plan = synth.smooth_path(frames, 480, 360, patch.shape[1])
    background = synth.background(480, 360)
    detector = create_detector(DetectorSettings(name="dlib"), announce=False)
    crops = []
    for placement in plan:
        frame = synth.paste_patch(background, patch, placement)
        face = max(detector.detect(frame, embed=False), key=lambda f: f.score)
        crops.append(warp_crop(frame, alignment_matrix(face.kps, size), size))
    return np.stack(crops)


def change(latents: torch.Tensor) -> float:
    return float((latents[1:] - latents[:-1]).abs().mean())


def main(frames: int = 12, steps: int = 4) -> None:
    torch.manual_seed(0)
    results = {}
    crops = None
    for recipe in ("student", "inversion"):
        preset = with_overrides(load_preset("tiny"), recipe=recipe, inversion_steps=steps, sampling_steps=steps)
        pipe = ApplePipeline.from_preset(preset, torch.device("cpu"))
        crops = track_crops(frames, preset.sampling.crop_size) if crops is None else crops
        g = torch.Generator().manual_seed(1)
        source = torch.randn(1, 32, 16, generator=g)
        identity = pipe.identity
        null = pipe.transformer.pulid_encoder.null_embedding(torch.zeros(1, identity.id_dim),
                                                             [torch.zeros(1, 17, identity.vit_dim)] * 5)
        seeds = [track_seed(0, 0)] * frames
        swapped = torch.cat([pipe.swap_latents(crops[i : i + 4], source, null, seeds[i : i + 4]) for i in range(0, frames, 4)])
        kept = torch.cat([pipe.swap_latents(crops[i : i + 4], null, null, seeds[i : i + 4]) for i in range(0, frames, 4)])
        target = L.encode(pipe.vae, crops)
        s = preset.sampling
        results[recipe] = (change(swapped) / change(target), float((kept - target).abs().mean() / target.abs().mean()),
                           s.sampling_steps + (s.inversion_steps if recipe == "inversion" else 0))
    print(f"tiny preset, {steps} steps, {frames} aligned crops of one track")
    print("| recipe | follows the target (output change / input change) | reconstruction error, null id "
          "(relative) | calls |")
    print("|---|---|---|---|")
    for recipe, (flicker, error, calls) in results.items():
        print(f"| {recipe} | {flicker:.2f} | {error:.2f} | {calls} |")


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:3]))

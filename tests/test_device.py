"""Device placement: every loop runs with the model and its inputs on the `meta` device.

A tensor created on the host that meets a meta tensor in a matmul, a cat or an elementwise op raises, as it does
on a GPU ("Expected all tensors to be on the same device"); 0-dim host scalars pass on both. So these tests catch
on a CPU-only machine what would crash the first call on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apple_video.config import load_preset, with_overrides
from apple_video.faces.detect import create_detector
from apple_video.faces.sources import source_faces
from apple_video.models import latents as L
from apple_video.models.pipeline import ApplePipeline, build_tiny
from apple_video.sampling.flow import FlowCondition, invert, sample
from apple_video.sampling.schedule import flux_schedule
from apple_video.settings import DetectorSettings

META = torch.device("meta")


def _tiny_preset(**sampling):
    return with_overrides(load_preset("tiny"), inversion_steps=2, sampling_steps=2, **sampling)


@torch.no_grad()
def test_invert_and_sample_on_meta() -> None:
    transformer, vae, prompt, _ = build_tiny(load_preset("tiny"))
    transformer.to(META)
    b, n, c = 2, 64, transformer.config.in_channels
    cond = FlowCondition(prompt.prompt_embeds.to(META).expand(b, -1, -1), prompt.pooled_embeds.to(META).expand(b, -1),
                         L.image_ids(128, 128, vae, META), prompt.txt_ids.to(META), 1.0,
                         torch.empty(b, n, c, device=META), torch.empty(b, 32, 16, device=META))
    latents = torch.empty(b, n, c, device=META)
    schedule = flux_schedule(3, n)  # built on the host, as callers do: the loops must move it themselves

    def velocity(inputs, cache):
        return transformer(inputs, cache)

    null = torch.empty(b, 32, 16, device=META)
    for second_order in (False, True):
        noise = invert(velocity, latents, cond.attribute_only(null), schedule, second_order)
        assert noise.device == META and noise.shape == latents.shape
    out = sample(velocity, noise, cond, schedule, null_id=null, id_guidance=2.0)
    assert out.device == META and out.shape == latents.shape


@pytest.mark.parametrize("recipe", ["inversion", "student"])
def test_pipeline_swap_path_on_meta(recipe: str, hopper: np.ndarray, astronaut: np.ndarray) -> None:
    pipe = ApplePipeline.from_preset(_tiny_preset(recipe=recipe), torch.device("cpu"))
    sources = source_faces([hopper], ["hopper"], create_detector(DetectorSettings(name="dlib")), 128)
    pipe.to(META)
    id_embed, null = pipe.id_embedding(sources)
    assert id_embed.device == META and null.device == META
    crops = np.stack([np.ascontiguousarray(astronaut[:128, :128]), np.ascontiguousarray(astronaut[100:228, 150:278])])
    out = pipe.swap_latents(crops, id_embed, null, [0, 0])
    assert out.device == META and out.shape[0] == 2
    with torch.no_grad():
        pixels = L.decode_latents(pipe.vae, out, 128, 128)
    assert pixels.device == META and pixels.shape == (2, 3, 128, 128)


def test_offloaded_pipeline_streams_weights_to_the_device(astronaut: np.ndarray) -> None:
    """--offload: the blocks' weights stay on the host and are copied to the device while each block runs; the same
    host tensors are back afterwards (nothing is copied for good, nothing is left on the device)."""
    pipe = ApplePipeline.from_preset(_tiny_preset(), META, offload=True)
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    host = [{id(p) for p in block.parameters()} for block in blocks]
    assert all(p.device.type == "cpu" for block in blocks for p in block.parameters())
    assert all(p.device == META for p in pipe.transformer.x_embedder.parameters())  # the rest lives on the device
    # a meta input meeting a host weight raises (see the top): the call only passes if each block's weights were
    # on the device while it ran
    crops = np.ascontiguousarray(astronaut[None, :128, :128])
    tokens = pipe.swap_latents(crops, torch.zeros(1, 32, 16), torch.zeros(1, 32, 16), [0])
    assert tokens.device == META
    assert [{id(p) for p in block.parameters()} for block in blocks] == host
    assert all(p.device.type == "cpu" for block in blocks for p in block.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device: host -> GPU is what --offload copies")
def test_offload_gives_the_same_crops_on_cuda(astronaut: np.ndarray) -> None:
    crops = np.ascontiguousarray(astronaut[None, :128, :128])
    id_embed, null = torch.randn(1, 32, 16, generator=torch.Generator().manual_seed(1)), torch.zeros(1, 32, 16)
    cuda = torch.device("cuda")
    plain = ApplePipeline.from_preset(_tiny_preset(), cuda)
    offloaded = ApplePipeline.from_preset(_tiny_preset(), cuda, offload=True)
    assert torch.equal(plain.swap_latents(crops, id_embed, null, [0]), offloaded.swap_latents(crops, id_embed, null, [0]))


def test_auto_batch_size_from_free_memory() -> None:
    from apple_video.models.pipeline import CPU_BATCH_LIMIT, CUDA_BATCH_LIMIT, GIB, choose_batch_size

    per_crop = int(load_preset("krea-512").model.crop_memory_gib * GIB)
    assert choose_batch_size(80 * GIB - 24 * GIB, per_crop, CUDA_BATCH_LIMIT) == 16  # an 80 GB card, model loaded
    assert choose_batch_size(14 * GIB, per_crop, CUDA_BATCH_LIMIT) == 8  # (14 - 2 reserve) / 1.5
    assert choose_batch_size(3 * GIB, per_crop, CUDA_BATCH_LIMIT) == 1 == choose_batch_size(0, per_crop, 16)
    assert choose_batch_size(64 * GIB, per_crop, CPU_BATCH_LIMIT) == 4
    pipe = ApplePipeline.from_preset(_tiny_preset(), torch.device("cpu"))
    assert 1 <= pipe.auto_batch_size() <= CPU_BATCH_LIMIT

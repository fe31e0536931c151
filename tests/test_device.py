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


def test_offload_with_fp8_is_refused_before_any_weight_is_built() -> None:
    """Offloaded blocks stream plain bf16 host buffers, so torchao's float8 weights would be dropped silently: the
    pair is refused in one line, before the model is built (the check the planning step calls too)."""
    from apple_video.errors import UserError
    from apple_video.models.pipeline import check_speed_options

    with pytest.raises(UserError, match="--offload and --fp8 cannot be combined") as caught:
        ApplePipeline.from_preset(_tiny_preset(fp8=True), torch.device("cpu"), offload=True)
    assert len(str(caught.value).splitlines()) == 1
    for offload, fp8 in ((True, False), (False, True), (False, False)):
        check_speed_options(offload, fp8)  # each lever alone is fine


def test_offloaded_blocks_live_in_one_exact_host_buffer_each() -> None:
    """Each block's weights are views of one flat host buffer the size of the weights (ALIGN-padded per tensor),
    which is what gets page-locked in place: not PyTorch's pinned allocator, which rounds every allocation up to a
    power of two. The streamed forward equals the resident one."""
    from apple_video.models.offload import ALIGN

    transformer, _, _, _ = build_tiny(load_preset("tiny"))
    inputs = _forward_inputs(transformer)
    with torch.no_grad():
        resident = transformer(inputs)
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    sizes = [[t.numel() * t.element_size() for t in [*b.parameters(), *b.buffers()]] for b in blocks]
    transformer.stream_blocks(torch.device("cpu"))
    offloader = transformer.offloader
    for block, flat, block_sizes in zip(blocks, offloader.buffers, sizes, strict=True):
        assert sum(block_sizes) <= flat.numel() <= sum(block_sizes) + ALIGN * len(block_sizes)
        base = flat.untyped_storage().data_ptr()
        assert all(p.untyped_storage().data_ptr() == base for p in block.parameters())
    assert offloader.host_bytes == sum(flat.numel() for flat in offloader.buffers)
    with torch.no_grad():
        streamed = transformer(inputs)
    assert torch.equal(resident, streamed)
    assert offloader.copied_bytes == offloader.host_bytes + offloader.buffers[0].numel()  # + block 0, prefetched


def _forward_inputs(transformer, batch: int = 1):
    from apple_video.sampling.inputs import TransformerInputs

    g = torch.Generator().manual_seed(3)
    cfg = transformer.config
    side = 8
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    return TransformerInputs(
        latents=torch.randn(batch, side * side, cfg.in_channels, generator=g), timestep=torch.full((batch,), 0.5),
        prompt_embeds=torch.randn(batch, 8, cfg.joint_attention_dim, generator=g),
        pooled_embeds=torch.randn(batch, cfg.pooled_projection_dim, generator=g), img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(8, 3), guidance=torch.ones(batch),
        condition=torch.randn(batch, side * side, cfg.in_channels, generator=g),
        id_embed=torch.randn(batch, 32, 16, generator=g))


def test_compiled_blocks_trace_static_graphs_for_the_cache_read() -> None:
    """`compile_blocks` traces static shapes (`dynamic=False`): the condition-cache write (image + condition tokens)
    and read (image tokens only) each get exact graphs, also when a second batch size comes (where automatic dynamic
    shapes would retrace symbolic graphs), and a batch size seen before compiles nothing more."""
    from torch._dynamo.utils import counters

    from apple_video.sampling.inputs import ConditionKVCache

    symbolic: list[bool] = []

    def recording_backend(graph: torch.fx.GraphModule, example_inputs):
        values = [node.meta.get("example_value") for node in graph.graph.nodes if node.op == "placeholder"]
        symbolic.append(any(isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor) and any(
            isinstance(size, torch.SymInt) for size in v.shape)) for v in values))
        return graph.forward

    transformer, _, _, _ = build_tiny(with_overrides(load_preset("tiny"), independent_condition=True))
    torch._dynamo.reset()
    counters.clear()
    transformer.compile_blocks(True, backend=recording_backend)
    try:
        assert transformer.compile_options["dynamic"] is False
        frames = []
        with torch.no_grad():
            for batch in (2, 3, 2):
                inputs, cache = _forward_inputs(transformer, batch), ConditionKVCache()
                transformer(inputs, cache)  # writes the condition K/V
                transformer(inputs, cache)  # reads them
                frames.append(counters["frames"]["total"])
        assert symbolic and not any(symbolic)
        assert frames[2] == frames[1] > frames[0]  # batch 3 compiled its own graphs; batch 2 again: nothing new
    finally:
        transformer.compile_blocks(False)
        torch._dynamo.reset()

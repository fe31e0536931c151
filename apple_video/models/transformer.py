"""APPLE's transformer: diffusers' FLUX transformer run over three token branches (text, image, condition)
with per-branch LoRA and PuLID identity injection.

Semantics follow the official APPLE code (OminiControl's multi-branch forward + PuLID-FLUX):
- every branch has its own adaLN modulation from its own timestep embedding (double AND single blocks);
  the text branch uses the image branch's timestep; condition tokens use timestep 0 and guidance 1;
- the condition tokens carry the same RoPE position ids as the image tokens;
- the LoRA adapter acts only while computing the condition branch (scale exactly 1 there, 0 elsewhere);
- PuLID: after double block i (i % double_interval == 0) and single block j (j % single_interval == 0) the
  image tokens get `id_weight * pulid_ca[k](id, image)`;
- attention: every query attends to the keys of every branch, except that with `independent_condition`
  condition queries attend only to condition keys. Then condition K/V are the same at every step and a
  `ConditionKVCache` computes them once.

The forward is packed (`models/packed.py`): tokens that share weights share one linear, the LoRA delta only on
condition rows, RoPE and time embeddings reused across calls, optionally one compiled graph per block kind. Its
check, the per-branch reference that mirrors the official code line by line, lives beside the oracle tests
(`tests/oracle_reference.py`).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import register_to_config
from torch import nn

from apple_video.errors import UserError
from apple_video.models import packed
from apple_video.models.pulid import IDFormer, PerceiverAttentionCA
from apple_video.sampling.inputs import ConditionKVCache, TransformerInputs  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)


def require_torchao() -> None:
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise UserError("--fp8 needs torchao: pip install torchao (or leave --fp8 off)") from None


FP8_MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9) and Hopper (9.0) onwards
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


def fp8_filter(module: nn.Module, name: str) -> bool:
    """The linears float8 pays on and keeps accuracy with: those inside the transformer blocks (attention, MLP,
    adaLN), not the embedders (x/context/time), not the final projection, not the LoRA or PuLID modules."""
    return isinstance(module, nn.Linear) and name.startswith(BLOCK_PREFIXES) and "lora_" not in name


def check_fp8_capability(capability: tuple[int, int], name: str = "this GPU") -> None:
    if tuple(capability) < FP8_MIN_CAPABILITY:
        raise UserError(f"--fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); {name} is "
                        f"{capability[0]}.{capability[1]}: leave --fp8 off")


def to_float8(transformer: nn.Module) -> None:
    """Dynamic float8 activations and weights (torchao, per-row scales) for the block linears (`fp8_filter`)."""
    require_torchao()
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=fp8_filter)


def speed_up(transformer: AppleFluxTransformer, compile_blocks: bool, fp8: bool, device: torch.device) -> None:
    """The optional levers that only pay on a GPU: float8 linears, then one compiled graph per block kind."""
    if fp8:
        if device.type != "cuda":
            require_torchao()  # a missing torchao is reported on every machine, not only on GPU hosts
            logger.warning("fp8 needs a CUDA GPU (Hopper/Ada); ignored on %s", device)
        else:
            check_fp8_capability(torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device))
            to_float8(transformer)
    if compile_blocks and device.type == "cuda":
        transformer.compile_blocks(True)


class _Memo:
    """Values computed from a few input tensors, reused while those very tensors are alive and unmodified
    (RoPE tables per crop size, time embeddings per schedule time). Small and per model: no global state."""

    def __init__(self, size: int = 128) -> None:
        self.size = size
        self._items: dict[tuple, tuple[list, list[int], object]] = {}

    def get(self, tensors: tuple[torch.Tensor, ...], extra: tuple, compute: Callable[[], object]) -> object:
        try:
            versions = [t._version for t in tensors]
        except RuntimeError:  # inference-mode tensors have no version counter: do not reuse
            return compute()
        key = (tuple(id(t) for t in tensors), extra)
        hit = self._items.get(key)
        if hit is not None and all(ref() is t for ref, t in zip(hit[0], tensors, strict=True)) and hit[1] == versions:
            return hit[2]
        value = compute()
        if len(self._items) >= self.size:
            self._items.pop(next(iter(self._items)))
        self._items[key] = ([weakref.ref(t) for t in tensors], versions, value)
        return value


class AppleFluxTransformer(FluxTransformer2DModel):
    """`FluxTransformer2DModel` + PuLID (`pulid_ca`, optional `pulid_encoder`) with the multi-branch forward."""

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = True,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        pulid_dim_head: int = 128,
        pulid_heads: int = 16,
        pulid_kv_dim: int = 2048,
        pulid_double_interval: int = 2,
        pulid_single_interval: int = 4,
        pulid_num_ca: int | None = None,
        idformer: dict | None = None,
        independent_condition: bool = False,
    ) -> None:
        super().__init__(
            patch_size=patch_size, in_channels=in_channels, out_channels=out_channels, num_layers=num_layers,
            num_single_layers=num_single_layers, attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads, joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim, guidance_embeds=guidance_embeds, axes_dims_rope=axes_dims_rope,
        )
        needed = len(range(0, num_layers, pulid_double_interval)) + len(range(0, num_single_layers, pulid_single_interval))
        count = max(needed, pulid_num_ca or 0)  # PuLID/APPLE always build 20, whatever the depth
        self.pulid_ca = nn.ModuleList(
            PerceiverAttentionCA(dim=self.inner_dim, dim_head=pulid_dim_head, heads=pulid_heads, kv_dim=pulid_kv_dim)
            for _ in range(count)
        )
        self.pulid_encoder = IDFormer(**idformer) if idformer is not None else None
        self._compiled: dict[Callable, Callable] = {}
        self.compile_options: dict = {}  # what compile_blocks passed to torch.compile
        self._memo = _Memo()
        self.stream_device: torch.device | None = None  # set by stream_blocks(): blocks live on the host
        self.offloader = None

    # -- memory switch -------------------------------------------------------------------------------------------
    def stream_blocks(self, device: torch.device) -> None:
        """Keep the transformer blocks (nearly all the weights) in pinned host memory and copy each one to `device`
        only while it runs, the next block's copy overlapping this one's compute (`offload.BlockOffloader`);
        everything else moves to `device`. Exact: the same weights and kernels."""
        from apple_video.models.offload import BlockOffloader

        blocks = {"transformer_blocks", "single_transformer_blocks"}
        for name, child in self.named_children():
            if name not in blocks:
                child.to(device)
        self.offloader = BlockOffloader([*self.transformer_blocks, *self.single_transformer_blocks], device)
        self.stream_device = torch.device(device)
        self._memo = _Memo()

    @contextmanager
    def _resident(self, block: nn.Module) -> Iterator[None]:
        """`block`'s weights on the stream device for the duration (a no-op without `stream_blocks`)."""
        if self.offloader is None:
            yield
            return
        with self.offloader.resident(block):
            yield

    # -- speed switches ------------------------------------------------------------------------------------------
    def compile_blocks(self, enabled: bool = True, **options) -> None:
        """torch.compile each block kind once: one graph serves every block (parameters are graph inputs).

        Static shapes (`dynamic=False`) unless `options` say otherwise: a run calls at one padded batch size, so
        each layout (with condition tokens, writing or reading the condition K/V cache) gets its own exact graph,
        where automatic dynamic shapes would trace a symbolic one after the second size and compile once more."""
        options = {"dynamic": False, **options}
        self._compiled = {fn: torch.compile(fn, **options) for fn in (packed.double_block, packed.single_block)} \
            if enabled else {}
        self.compile_options = options if enabled else {}

    @property
    def compiled(self) -> bool:
        return bool(self._compiled)

    # -- helpers -------------------------------------------------------------------------------------------------
    def _temb(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        dtype = pooled.dtype
        timestep = timestep.to(dtype) * 1000
        if self.config.guidance_embeds:
            guidance = (guidance if guidance is not None else torch.ones_like(timestep)).to(dtype) * 1000
            return self.time_text_embed(timestep, guidance, pooled)
        return self.time_text_embed(timestep, pooled)

    # -- forward ---------------------------------------------------------------------------------------------------
    def _time_rows(self, x: TransformerInputs, with_condition: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(temb of the image branch (B, D), silu(temb) rows (nseg * B, D): image branch[, condition branch])."""
        timestep = x.timestep
        guidance = x.guidance if x.guidance is not None else torch.ones_like(timestep)
        pooled = x.pooled_embeds
        if with_condition:  # condition tokens: timestep 0, guidance 1
            timestep = torch.cat([timestep, torch.zeros_like(timestep)])
            guidance = torch.cat([guidance, torch.ones_like(guidance)])
            pooled = torch.cat([pooled, pooled])
        temb = self._temb(timestep, guidance, pooled)
        return temb[: x.latents.shape[0]], F.silu(temb)

    def _rope(self, ids: list[torch.Tensor]) -> packed.Rope:
        return packed.rope_table(*self.pos_embed(torch.cat(ids)))

    def _segments(self, before: int, condition: int, device: torch.device) -> torch.Tensor | None:
        """Token -> modulation row (0: text/image, 1: condition); None when there are no condition tokens."""
        if not condition:
            return None
        return self._memo.get((), ("segments", before, condition, device), lambda: torch.cat(
            [torch.zeros(before, dtype=torch.long, device=device), torch.ones(condition, dtype=torch.long, device=device)]))

    def _run_packed(self, fn: Callable, block, hiddens: tuple[torch.Tensor, ...], *args):
        fn = self._compiled.get(fn, fn)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, block, *hiddens, *args, use_reentrant=False)
        with self._resident(block):
            return fn(block, *hiddens, *args)

    def _pulid(self, hidden: torch.Tensor, start: int, count: int, x: TransformerInputs, k: int) -> torch.Tensor:
        image = hidden[:, start : start + count]
        return hidden.slice_scatter(image + x.id_weight * self.pulid_ca[k](x.id_embed, image), 1, start, start + count)

    def forward(self, inputs: TransformerInputs, cache: ConditionKVCache | None = None) -> torch.Tensor:  # type: ignore[override]
        """Velocity for the image tokens, (B, N, C)."""
        if cache is not None and not self.config.independent_condition:
            raise ValueError("the condition K/V cache is exact only with independent_condition=True")
        x = inputs
        reading = cache is not None and cache.filled
        with_condition = x.condition is not None and not reading
        writing = cache is not None and with_condition
        b, n, t = x.latents.shape[0], x.latents.shape[1], x.prompt_embeds.shape[1]
        layout = packed.Layout(text=t, image=n, condition=x.condition.shape[1] if with_condition else 0,
                               independent=self.config.independent_condition, adapter=x.adapter)
        tokens = torch.cat([x.latents, x.condition.to(x.latents.dtype)], 1) if with_condition else x.latents
        ic = packed.lora_linear(self.x_embedder, tokens, n if with_condition else None, x.adapter)
        txt = self.context_embedder(x.prompt_embeds)
        if x.time_key is None:
            temb, emb = self._time_rows(x, with_condition)
        else:  # the caller vouches that timestep/guidance hold time_key for every row: reuse across calls
            # keyed on the embedder's weights too, so loading new weights recomputes
            temb, emb = self._memo.get((x.pooled_embeds, *self.time_text_embed.parameters()),
                                       ("time", x.time_key, b, with_condition, x.latents.dtype, torch.is_grad_enabled()),
                                       lambda: self._time_rows(x, with_condition))
        ids = [x.txt_ids, x.img_ids]
        if with_condition:
            ids.append(x.cond_ids if x.cond_ids is not None else x.img_ids)
        rope = self._memo.get(tuple(ids), ("rope",), lambda: self._rope(ids))
        seg_ic = self._segments(n, layout.condition, tokens.device)
        seg_all = self._segments(t + n, layout.condition, tokens.device)
        ca, depth = 0, len(self.transformer_blocks)
        for i, block in enumerate(self.transformer_blocks):
            cached = cache.keys[i] if reading else None
            txt, ic, kv = self._run_packed(packed.double_block, block, (txt, ic), emb, rope, seg_ic, layout, cached)
            if writing:
                cache.keys[i] = (kv[0].contiguous(), kv[1].contiguous())
            if i % self.config.pulid_double_interval == 0:
                if x.id_embed is not None:
                    ic = self._pulid(ic, 0, n, x, ca)
                ca += 1
        hidden = torch.cat([txt, ic], 1)
        for j, block in enumerate(self.single_transformer_blocks):
            cached = cache.keys[depth + j] if reading else None
            hidden, kv = self._run_packed(packed.single_block, block, (hidden,), emb, rope, seg_all, layout, cached)
            if writing:
                cache.keys[depth + j] = (kv[0].contiguous(), kv[1].contiguous())
            if j % self.config.pulid_single_interval == 0:
                if x.id_embed is not None:
                    hidden = self._pulid(hidden, t, n, x, ca)
                ca += 1
        return self.proj_out(self.norm_out(hidden[:, t : t + n], temb))


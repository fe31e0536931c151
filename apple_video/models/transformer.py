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

Two forwards compute this: the packed one (default, `models/packed.py`: tokens that share weights share one
linear, the LoRA delta only on condition rows, RoPE and time embeddings reused across calls, optionally one
compiled graph per block kind) and the per-branch reference (`packed = False`), which mirrors the official
code line by line and serves as the check of the packed one.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import apply_rotary_emb
from peft.tuners.lora import LoraLayer
from torch import nn

from apple_video.errors import UserError
from apple_video.models import packed
from apple_video.models.pulid import IDFormer, PerceiverAttentionCA
from apple_video.sampling.inputs import ConditionKVCache, TransformerInputs  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)


def _require_torchao() -> None:
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
    _require_torchao()
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=fp8_filter)


def speed_up(transformer: AppleFluxTransformer, compile_blocks: bool, fp8: bool, device: torch.device) -> None:
    """The optional levers that only pay on a GPU: float8 linears, then one compiled graph per block kind."""
    if fp8:
        if device.type != "cuda":
            _require_torchao()  # a missing torchao is reported on every machine, not only on GPU hosts
            logger.warning("fp8 needs a CUDA GPU (Hopper/Ada); ignored on %s", device)
        else:
            check_fp8_capability(torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device))
            to_float8(transformer)
    if compile_blocks and device.type == "cuda":
        transformer.compile_blocks(True)


@contextmanager
def lora_scope(layers: list[LoraLayer], adapter: str | None) -> Iterator[None]:
    """Within the block, only `adapter` is on, at scale exactly 1 (the official switch; alpha/r is ignored)."""
    saved = [dict(layer.scaling) for layer in layers]
    for layer in layers:
        for name in layer.scaling:
            layer.scaling[name] = 1.0 if name == adapter else 0.0
    try:
        yield
    finally:
        for layer, scales in zip(layers, saved, strict=True):
            layer.scaling.update(scales)


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


@dataclass
class Branch:
    """One token branch of a forward call."""

    hidden: torch.Tensor  # (B, N, inner_dim)
    temb: torch.Tensor  # (B, inner_dim)
    rope: tuple[torch.Tensor, torch.Tensor]
    adapter: str | None
    kind: str  # "text" | "image" | "condition"


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
        self._block_loras: dict[int, list[LoraLayer]] = {}
        self.packed = True  # False: the reference per-branch forward (peft scales switched per branch)
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
    def refresh_lora_layers(self) -> None:
        """Forget the cached LoRA layer lists (call after adding or removing adapters)."""
        self._block_loras = {}

    def _loras(self, module: nn.Module) -> list[LoraLayer]:
        key = id(module)
        if key not in self._block_loras:
            self._block_loras[key] = [m for m in module.modules() if isinstance(m, LoraLayer)]
        return self._block_loras[key]

    def _temb(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        dtype = pooled.dtype
        timestep = timestep.to(dtype) * 1000
        if self.config.guidance_embeds:
            guidance = (guidance if guidance is not None else torch.ones_like(timestep)).to(dtype) * 1000
            return self.time_text_embed(timestep, guidance, pooled)
        return self.time_text_embed(timestep, pooled)

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, heads, -1).transpose(1, 2)

    def _attend(self, qkv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], kinds: list[str], layer: int,
                cache: ConditionKVCache | None, reading: bool) -> list[torch.Tensor]:
        """Joint attention over branches, honouring independent_condition and the condition K/V cache."""
        independent = self.config.independent_condition
        keys = [k for _, k, _ in qkv]
        values = [v for _, _, v in qkv]
        if cache is not None and reading:
            cached_k, cached_v = cache.keys[layer]
            keys, values = [*keys, cached_k], [*values, cached_v]
        elif cache is not None:
            cond = [i for i, kind in enumerate(kinds) if kind == "condition"]
            cache.keys[layer] = (torch.cat([keys[i] for i in cond], 2), torch.cat([values[i] for i in cond], 2))
        main = [i for i, kind in enumerate(kinds) if not (independent and kind == "condition")]
        outputs: dict[int, torch.Tensor] = {}
        if main:
            q = torch.cat([qkv[i][0] for i in main], dim=2)
            out = F.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(values, 2))
            for i, piece in zip(main, out.split([qkv[i][0].shape[2] for i in main], dim=2), strict=True):
                outputs[i] = piece
        for i in range(len(kinds)):
            if i not in outputs:  # independent condition: attends only to condition keys
                cond = [j for j, other in enumerate(kinds) if other == "condition"]
                outputs[i] = F.scaled_dot_product_attention(
                    qkv[i][0], torch.cat([qkv[j][1] for j in cond], 2), torch.cat([qkv[j][2] for j in cond], 2))
        b = qkv[0][0].shape[0]
        return [outputs[i].transpose(1, 2).reshape(b, outputs[i].shape[2], -1) for i in range(len(kinds))]

    def _qkv(self, attn, h: torch.Tensor, rope, text: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if text:
            q, k, v = attn.add_q_proj(h), attn.add_k_proj(h), attn.add_v_proj(h)
            norm_q, norm_k = attn.norm_added_q, attn.norm_added_k
        else:
            q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
            norm_q, norm_k = attn.norm_q, attn.norm_k
        q, k, v = (self._heads(t, attn.heads) for t in (q, k, v))
        q, k = norm_q(q), norm_k(k)
        return apply_rotary_emb(q, rope), apply_rotary_emb(k, rope), v

    def _double_block(self, block, branches: list[Branch], layer: int, cache: ConditionKVCache | None,
                      reading: bool) -> None:
        loras = self._loras(block)
        mods, qkv = [], []
        for br in branches:
            with lora_scope(loras, br.adapter):
                if br.kind == "text":
                    normed, *mod = block.norm1_context(br.hidden, emb=br.temb)
                else:
                    normed, *mod = block.norm1(br.hidden, emb=br.temb)
                mods.append(mod)
                qkv.append(self._qkv(block.attn, normed, br.rope, text=br.kind == "text"))
        attn_out = self._attend(qkv, [br.kind for br in branches], layer, cache, reading)
        for br, (gate_msa, shift_mlp, scale_mlp, gate_mlp), out in zip(branches, mods, attn_out, strict=True):
            with lora_scope(loras, br.adapter):
                if br.kind == "text":
                    h = br.hidden + block.attn.to_add_out(out) * gate_msa.unsqueeze(1)
                    normed = block.norm2_context(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
                    h = h + block.ff_context(normed) * gate_mlp.unsqueeze(1)
                else:
                    h = br.hidden + block.attn.to_out[0](out) * gate_msa.unsqueeze(1)
                    normed = block.norm2(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
                    h = h + block.ff(normed) * gate_mlp.unsqueeze(1)
            br.hidden = h

    def _single_block(self, block, branches: list[Branch], layer: int, cache: ConditionKVCache | None,
                      reading: bool) -> None:
        loras = self._loras(block)
        gates, mlps, qkv = [], [], []
        for br in branches:
            with lora_scope(loras, br.adapter):
                normed, gate = block.norm(br.hidden, emb=br.temb)
                mlps.append(block.act_mlp(block.proj_mlp(normed)))
                gates.append(gate)
                qkv.append(self._qkv(block.attn, normed, br.rope, text=False))
        attn_out = self._attend(qkv, [br.kind for br in branches], layer, cache, reading)
        for br, gate, mlp, out in zip(branches, gates, mlps, attn_out, strict=True):
            with lora_scope(loras, br.adapter):
                br.hidden = gate.unsqueeze(1) * block.proj_out(torch.cat([out, mlp], dim=2)) + br.hidden

    def _run_block(self, fn, block, branches: list[Branch], layer: int, cache: ConditionKVCache | None,
                   reading: bool) -> None:
        """Run one block, recomputing its activations in the backward pass when gradient checkpointing is on."""
        if not (self.gradient_checkpointing and torch.is_grad_enabled() and cache is None):
            with self._resident(block):
                fn(block, branches, layer, cache, reading)
            return

        def run(*hiddens: torch.Tensor) -> tuple[torch.Tensor, ...]:
            for branch, hidden in zip(branches, hiddens, strict=True):
                branch.hidden = hidden
            fn(block, branches, layer, None, False)
            return tuple(branch.hidden for branch in branches)

        outputs = torch.utils.checkpoint.checkpoint(run, *[br.hidden for br in branches], use_reentrant=False)
        for branch, hidden in zip(branches, outputs, strict=True):
            branch.hidden = hidden

    # -- packed forward (default) ---------------------------------------------------------------------------------
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

    def _forward_packed(self, x: TransformerInputs, cache: ConditionKVCache | None) -> torch.Tensor:
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

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, inputs: TransformerInputs, cache: ConditionKVCache | None = None) -> torch.Tensor:  # type: ignore[override]
        """Velocity for the image tokens, (B, N, C)."""
        if cache is not None and not self.config.independent_condition:
            raise ValueError("the condition K/V cache is exact only with independent_condition=True")
        if self.packed:
            return self._forward_packed(inputs, cache)
        return self._forward_reference(inputs, cache)

    def _forward_reference(self, x: TransformerInputs, cache: ConditionKVCache | None) -> torch.Tensor:
        """The per-branch forward the official code runs (peft LoRA on every branch, its scale switched)."""
        loras = self._loras(self.x_embedder)
        with lora_scope(loras, None):
            image = self.x_embedder(x.latents)
        temb = self._temb(x.timestep, x.guidance, x.pooled_embeds)
        branches = [
            Branch(self.context_embedder(x.prompt_embeds), temb, self.pos_embed(x.txt_ids), None, "text"),
            Branch(image, temb, self.pos_embed(x.img_ids), None, "image"),
        ]
        reading = cache is not None and cache.filled
        use_condition = x.condition is not None and not reading
        if use_condition:
            with lora_scope(loras, x.adapter):
                cond = self.x_embedder(x.condition)
            zeros = torch.zeros_like(x.timestep)
            cond_temb = self._temb(zeros, torch.ones_like(x.timestep), x.pooled_embeds)
            cond_ids = x.cond_ids if x.cond_ids is not None else x.img_ids
            branches.append(Branch(cond, cond_temb, self.pos_embed(cond_ids), x.adapter, "condition"))
        elif cache is not None and not cache.filled:
            cache = None  # nothing to cache without a condition
        ca = 0
        for i, block in enumerate(self.transformer_blocks):
            self._run_block(self._double_block, block, branches, i, cache, reading)
            if x.id_embed is not None and i % self.config.pulid_double_interval == 0:
                branches[1].hidden = branches[1].hidden + x.id_weight * self.pulid_ca[ca](x.id_embed, branches[1].hidden)
            if i % self.config.pulid_double_interval == 0:
                ca += 1
        for j, block in enumerate(self.single_transformer_blocks):
            self._run_block(self._single_block, block, branches, len(self.transformer_blocks) + j, cache, reading)
            if x.id_embed is not None and j % self.config.pulid_single_interval == 0:
                branches[1].hidden = branches[1].hidden + x.id_weight * self.pulid_ca[ca](x.id_embed, branches[1].hidden)
            if j % self.config.pulid_single_interval == 0:
                ca += 1
        return self.proj_out(self.norm_out(branches[1].hidden, temb))

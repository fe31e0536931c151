"""Build the APPLE model (tiny random or real checkpoints) and run one batch of crops through it."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from apple_video import weights
from apple_video.batches import run_in_batches
from apple_video.config import Preset, with_overrides
from apple_video.errors import DeviceError, UserError, WeightsError
from apple_video.faces.parsing import create_parser
from apple_video.faces.types import SourceFace
from apple_video.media.paths import atomic_write
from apple_video.models import latents as L
from apple_video.models.identity import IdentityFeatureExtractor, TinyIdentity
from apple_video.models.lora import add_condition_lora, fresh_condition_lora, load_lora, trained_independent
from apple_video.models.transformer import AppleFluxTransformer, ConditionKVCache, speed_up
from apple_video.sampling.flow import FlowCondition, invert, sample
from apple_video.sampling.schedule import flux_schedule
from apple_video.weights import ModelFiles

logger = logging.getLogger(__name__)

PROMPT = "a photo of human face"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PromptEmbeddings:
    prompt_embeds: torch.Tensor  # (1, T, joint_dim)
    pooled_embeds: torch.Tensor  # (1, pooled_dim)

    @property
    def txt_ids(self) -> torch.Tensor:
        return torch.zeros(self.prompt_embeds.shape[1], 3, dtype=self.prompt_embeds.dtype, device=self.prompt_embeds.device)

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> PromptEmbeddings:
        return PromptEmbeddings(self.prompt_embeds.to(device, dtype), self.pooled_embeds.to(device, dtype))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {name} was asked for but CUDA is not usable here (refusing to fall back to the CPU)")
    return torch.device(name)


GIB = 1024**3
CUDA_BATCH_LIMIT = 16  # past 8-16 crops a forward is already compute-bound (97% busy at 8 on an H200)
CPU_BATCH_LIMIT = 4


def choose_batch_size(free_bytes: int, per_crop_bytes: int, limit: int, reserve_bytes: int = 2 * GIB) -> int:
    """How many crops fit one model call: free memory, less a reserve, over the preset's per-crop estimate."""
    usable = max(0, free_bytes - reserve_bytes)
    return max(1, min(limit, usable // max(1, per_crop_bytes)))


def free_memory(device: torch.device) -> int:
    """Bytes free for activations on `device` (CUDA: the allocator's free memory; CPU: available RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def build_tiny(preset: Preset, files: ModelFiles = ModelFiles()
               ) -> tuple[AppleFluxTransformer, AutoencoderKL, PromptEmbeddings, TinyIdentity]:
    """The real classes with small seeded random weights (tests and smoke runs); `files` may hold the BiSeNet
    parser the identity input uses. Module initialisers draw from torch's global generator: it is seeded inside a
    fork, so the caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.model.seed)
        return _build_tiny(preset, torch.Generator().manual_seed(preset.model.seed), files)


def _build_tiny(preset: Preset, generator: torch.Generator, files: ModelFiles
                ) -> tuple[AppleFluxTransformer, AutoencoderKL, PromptEmbeddings, TinyIdentity]:
    m = preset.model
    identity = TinyIdentity(m.seed, parser=create_parser("auto", files, announce=False))
    p = m.pulid_settings
    transformer = AppleFluxTransformer(
        **(m.transformer or {}), pulid_dim_head=p.dim_head, pulid_heads=p.heads, pulid_kv_dim=p.kv_dim,
        pulid_double_interval=p.double_interval, pulid_single_interval=p.single_interval,
        independent_condition=preset.sampling.independent_condition,
        idformer=dict(dim=p.idformer_dim, depth=p.idformer_depth, dim_head=8, heads=2, num_id_token=5,
                      num_queries=p.id_tokens, output_dim=p.kv_dim, id_dim=identity.id_dim, vit_dim=identity.vit_dim),
    )
    add_condition_lora(transformer, m.lora_rank, init=False)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(m.vae.block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(m.vae.block_out_channels), block_out_channels=tuple(m.vae.block_out_channels),
        layers_per_block=m.vae.layers_per_block, latent_channels=m.vae.latent_channels, norm_num_groups=m.vae.norm_num_groups,
        scaling_factor=m.vae.scaling_factor, shift_factor=m.vae.shift_factor, use_quant_conv=False, use_post_quant_conv=False,
    )
    cfg = m.transformer or {}
    prompt = PromptEmbeddings(
        torch.randn(1, m.text_tokens, cfg.get("joint_attention_dim", 4096), generator=generator),
        torch.randn(1, cfg.get("pooled_projection_dim", 768), generator=generator),
    )
    return transformer.eval(), vae.eval(), prompt, identity


CPU_MAX_PARAMS = 2_000_000_000  # past this a CPU run is a float32 cast of tens of GB and hours per frame


def refuse_on_cpu(params: int, device: torch.device) -> None:
    if device.type == "cpu" and params > CPU_MAX_PARAMS:
        raise DeviceError(f"this preset's model has {params / 1e9:.1f} B parameters ({params * 4 / GIB:.0f} GiB in "
                          "float32 on a CPU): run it on a CUDA GPU (--device cuda), or use --swapper classic here")


PULID_CA_DIM_HEAD = 128  # PuLID-FLUX's fixed head sizes (not recorded in its checkpoint)
IDFORMER_DIM_HEAD = 64


def pulid_dims(shapes: dict[str, tuple[int, ...]], config: dict | None = None) -> dict:
    """AppleFluxTransformer's PuLID arguments read off a PuLID-FLUX checkpoint's tensor shapes (v0.9.1: IDFormer
    dim 1024, depth 10, 32 queries, 5 id tokens, output 2048; 20 cross-attentions of 16 x 128 heads). Head sizes
    are not in the shapes: PuLID's own unless `config` names ones that fit."""
    config = config or {}
    ca_inner = shapes["pulid_ca.0.to_q.weight"][0]
    dim_head = config.get("pulid_dim_head", PULID_CA_DIM_HEAD)
    if ca_inner % dim_head:
        dim_head = PULID_CA_DIM_HEAD if ca_inner % PULID_CA_DIM_HEAD == 0 else ca_inner
    dims: dict = dict(pulid_dim_head=dim_head, pulid_heads=ca_inner // dim_head,
                      pulid_kv_dim=shapes["pulid_ca.0.norm1.weight"][0], pulid_num_ca=20)  # PuLID always builds 20
    if "pulid_encoder.latents" not in shapes:
        return {**dims, "idformer": None}
    _, queries, dim = shapes["pulid_encoder.latents"]
    inner = shapes["pulid_encoder.layers.0.0.to_q.weight"][0]
    dims["idformer"] = dict(
        dim=dim, depth=len({k.split(".")[2] for k in shapes if k.startswith("pulid_encoder.layers.")}),
        dim_head=IDFORMER_DIM_HEAD, heads=max(1, inner // IDFORMER_DIM_HEAD), num_queries=queries,
        num_id_token=shapes["pulid_encoder.id_embedding_mapping.6.weight"][0] // dim,
        output_dim=shapes["pulid_encoder.proj_out"][1], ff_mult=shapes["pulid_encoder.layers.0.1.1.weight"][0] // dim,
        id_dim=shapes["pulid_encoder.id_embedding_mapping.0.weight"][1],
        vit_dim=shapes["pulid_encoder.mapping_0.0.weight"][1])
    return dims


def check_fits_device(flux_dir: Path, device: torch.device) -> None:
    """Refuse a full-size transformer on a CPU from its config alone (no weight read): the driver's early check."""
    config = dict(AppleFluxTransformer.load_config(str(flux_dir), subfolder="transformer"))
    with torch.device("meta"):
        model = FluxTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    refuse_on_cpu(sum(p.numel() for p in model.parameters()), device)


def load_transformer(flux_dir: Path, pulid_file: Path, dtype: torch.dtype, independent_condition: bool,
                     device: torch.device | None = None) -> AppleFluxTransformer:
    """FLUX transformer shards (diffusers layout) + PuLID-FLUX safetensors into one model, built on the meta device
    (refused before reading any weight when `device` is a CPU and the model is full size)."""
    config = dict(AppleFluxTransformer.load_config(str(flux_dir), subfolder="transformer"))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with safe_open(str(pulid_file), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    dims = pulid_dims(shapes, config)
    config = {k: v for k, v in config.items() if k not in dims}
    with torch.device("meta"):
        model = AppleFluxTransformer(**config, independent_condition=independent_condition, **dims)
    if device is not None:
        refuse_on_cpu(sum(p.numel() for p in model.parameters()), device)
    pulid = load_file(str(pulid_file))
    state: dict[str, torch.Tensor] = {}
    shards = sorted((flux_dir / "transformer").glob("*.safetensors"))
    if not shards:
        raise WeightsError(f"no transformer weights (*.safetensors) under {flux_dir / 'transformer'}")
    for shard in shards:
        state.update(load_file(str(shard)))
    state.update(pulid)
    try:
        missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    except RuntimeError as error:  # shape mismatches
        raise WeightsError(f"checkpoint does not fit the model: {str(error).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise WeightsError(f"checkpoint does not fit the model: {len(missing)} missing (e.g. {missing[:1]}), "
                           f"{len(unexpected)} unexpected (e.g. {unexpected[:1]})")
    return model.eval()


def prompt_cache_path(flux_dir: Path, prompt: str = PROMPT) -> Path:
    key = hashlib.sha256(f"{flux_dir.resolve()}|{prompt}".encode()).hexdigest()[:12]
    return weights.weights_home() / "cache" / f"prompt-{key}.safetensors"


def load_prompt_embeddings(flux_dir: Path, device: torch.device, dtype: torch.dtype, prompt: str = PROMPT) -> PromptEmbeddings:
    """T5/CLIP embeddings of a prompt (the fixed one by default), computed once and cached on disk; encoders freed
    afterwards."""
    path = prompt_cache_path(flux_dir, prompt)
    if not path.is_file():
        from diffusers import FluxPipeline

        logger.warning("encoding the prompt %r once with the FLUX text encoders (cached at %s)", prompt, path)
        pipe = FluxPipeline.from_pretrained(str(flux_dir), transformer=None, vae=None, dtype=dtype).to(device)
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device, max_sequence_length=512)
        path.parent.mkdir(parents=True, exist_ok=True)
        # temp then rename: several training processes may encode it at once, none reads a half-written file
        with atomic_write(path) as tmp:
            save_file({"prompt_embeds": embeds.cpu().contiguous(), "pooled_embeds": pooled.cpu().contiguous()}, str(tmp))
        del pipe
    tensors = load_file(str(path))
    return PromptEmbeddings(tensors["prompt_embeds"], tensors["pooled_embeds"])


def check_speed_options(offload: bool, fp8: bool) -> None:
    """Refuse option pairs that cannot work together, before any weight is read (callers: the planning step and
    the pipeline itself). `--offload --fp8`: the blocks are streamed from host memory as plain tensors, and
    torchao's float8 weights are tensor subclasses that the per-block host buffers cannot hold, so fp8 would be
    silently dropped."""
    if offload and fp8:
        raise UserError("--offload and --fp8 cannot be combined (offloaded blocks stream bf16 weights): "
                        "leave one of them off")


def _independent_if_trained(preset: Preset, lora: Path | None) -> Preset:
    """A LoRA trained with independent_condition runs that way (and caches the condition K/V): the model is built
    so from the start rather than its config rewritten after loading."""
    if lora is None or preset.sampling.independent_condition or not trained_independent(lora):
        return preset
    logger.info("%s was trained with independent_condition: condition K/V are cached across steps", lora.name)
    return with_overrides(preset, independent_condition=True)


class ApplePipeline:
    """Aligned target crops + source identity -> swapped crops, as APPLE does: encode -> starting noise -> sampling
    (id_src, F_att) -> decode. The starting noise is the preset's recipe: attribute-aware inversion (null id, F_att)
    of the crop (`inversion`), or seeded Gaussian noise (`student`, APPLE's own inference)."""

    def __init__(self, preset: Preset, transformer: AppleFluxTransformer, vae: AutoencoderKL, prompt: PromptEmbeddings,
                 identity: IdentityFeatureExtractor, device: torch.device, real: bool, offload: bool = False) -> None:
        self.preset = preset
        self.transformer = transformer
        self.vae = vae
        self.prompt = prompt
        self.identity = identity
        self.real = real
        self.offload = offload
        check_speed_options(offload, preset.sampling.fp8)
        self.to(device)

    def to(self, device: torch.device) -> ApplePipeline:
        """Put the model on `device`. With `offload`, the transformer blocks' weights stay in host memory and each
        block is copied to the device only while it runs (`AppleFluxTransformer.stream_blocks`)."""
        self.device = torch.device(device)
        self.dtype = DTYPES[self.preset.model.dtype] if self.device.type == "cuda" else torch.float32
        if self.offload:
            self.transformer.stream_blocks(self.device)
        else:
            self.transformer.to(self.device)
        self.vae.to(self.device)
        speed_up(self.transformer, self.preset.sampling.compile, self.preset.sampling.fp8, self.device)
        self._constants: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._compiled_batch: int | None = None
        return self

    def auto_batch_size(self) -> int:
        """Crops per model call that fit the free memory of this pipeline's device (call after loading)."""
        limit = CUDA_BATCH_LIMIT if self.device.type == "cuda" else CPU_BATCH_LIMIT
        return choose_batch_size(free_memory(self.device), int(self.preset.model.crop_memory_gib * GIB), limit)

    @classmethod
    def from_preset(cls, preset: Preset, device: torch.device, lora: str | Path | None = None,
                    offload: bool = False, files: ModelFiles = ModelFiles(),
                    seed: int = 0) -> ApplePipeline:
        """Build the preset's model; `lora` replaces the preset's LoRA (e.g. a student you trained), and "fresh"
        gives a new zero-effect LoRA of the preset's rank to train from scratch (no LoRA file needed), drawn from
        `seed` (see `fresh_condition_lora`). `files`: the model files a planner resolved (`apple_files`; the
        tiny preset needs none, and uses the BiSeNet parser only when they hold it)."""
        check_speed_options(offload, preset.sampling.fp8)
        if preset.model.kind == "tiny":
            preset = _independent_if_trained(preset, Path(lora) if lora not in (None, "fresh") else None)
            transformer, vae, prompt, identity = build_tiny(preset, files)
            if lora == "fresh":
                fresh_condition_lora(transformer, preset.model.lora_rank, seed=seed)
            elif lora is not None:
                load_lora(transformer, Path(lora))
            return cls(preset, transformer, vae, prompt, identity, device, real=False, offload=offload)
        return cls._from_checkpoints(preset, device, lora, offload, files, seed)

    @classmethod
    def _from_checkpoints(cls, preset: Preset, device: torch.device, lora: str | Path | None,
                          offload: bool, files: ModelFiles, seed: int = 0) -> ApplePipeline:
        from apple_video.models.real_identity import PulidIdentity

        dtype = DTYPES[preset.model.dtype] if device.type == "cuda" else torch.float32
        flux_dir = files("flux-krea-dev")
        lora_path = None if lora == "fresh" else Path(lora) if lora else files(preset.model.lora or "apple-student")
        preset = _independent_if_trained(preset, lora_path)
        transformer = load_transformer(flux_dir, files(preset.model.pulid or "pulid-flux-v0.9.1"), dtype,
                                       preset.sampling.independent_condition, device)
        if lora_path is None:
            fresh_condition_lora(transformer, preset.model.lora_rank, seed=seed)
        else:
            load_lora(transformer, lora_path)
        vae = AutoencoderKL.from_pretrained(str(flux_dir), subfolder="vae", torch_dtype=dtype)
        prompt = load_prompt_embeddings(flux_dir, device, dtype)
        return cls(preset, transformer, vae, prompt, PulidIdentity(device, files, create_parser("auto", files, announce=False)), device,
                   real=True, offload=offload)

    @torch.no_grad()
    def id_embedding(self, sources: list[SourceFace]) -> tuple[torch.Tensor, torch.Tensor]:
        """(id tokens averaged over the source photos, null id tokens = IDFormer(zeros))."""
        features = [self.identity(source) for source in sources]
        encoder = self.transformer.pulid_encoder
        if encoder is None:
            raise WeightsError("this checkpoint has no PuLID identity encoder (pulid_encoder.*)")
        tokens = [encoder(f.id_cond.to(self.device, self.dtype), [h.to(self.device, self.dtype) for h in f.vit_hidden])
                  for f in features]
        null = encoder.null_embedding(features[0].id_cond.to(self.device, self.dtype),
                                      [h.to(self.device, self.dtype) for h in features[0].vit_hidden])
        return torch.stack(tokens).mean(0), null

    def _velocity(self, inputs, cache: ConditionKVCache | None) -> torch.Tensor:
        return self.transformer(inputs, cache)

    @torch.no_grad()
    def swap(self, crops: np.ndarray, id_embed: torch.Tensor, null_id: torch.Tensor, seeds: list[int],
             conditions: np.ndarray | None = None) -> np.ndarray:
        """crops (B, S, S, 3) uint8 -> swapped crops (uint8, on the host); see `swap_latents`."""
        return L.decode(self.vae, self.swap_latents(crops, id_embed, null_id, seeds, conditions), crops.shape[1],
                        crops.shape[2])

    @torch.no_grad()
    def swap_latents(self, crops: np.ndarray, id_embed: torch.Tensor, null_id: torch.Tensor, seeds: list[int],
                     conditions: np.ndarray | None = None) -> torch.Tensor:
        """crops (B, S, S, 3) uint8 -> the swapped crops' packed latents, on the device; batch == one by one.

        The recipe decides where sampling starts: `inversion` inverts each crop with the null id and its attribute
        tokens; `student` starts from Gaussian noise drawn from `seeds` (one per crop: give every frame of a track
        the same seed and a still face gets the same noise every frame). `conditions` are the attribute images
        (default: the crops themselves, as the student uses them; the teacher takes the deblurred crops).
        `id_embed` is (1 or B, n_id, dim)."""
        b = crops.shape[0]
        per_crop = id_embed.shape[0] == b > 1  # one id per crop rather than one for all

        def run(rows: list[int]) -> torch.Tensor:
            return self._swap_latents(crops[rows], id_embed[rows] if per_crop else id_embed, null_id,
                                      [seeds[i] for i in rows], None if conditions is None else conditions[rows])

        # compiled blocks: one batch shape for the whole run (rows are independent, so padding is exact)
        return torch.cat(run_in_batches(b, self._fixed_batch(b), run))

    def _fixed_batch(self, batch: int) -> int:
        """With compiled blocks every call runs at the batch size of the first (smaller groups are padded,
        larger ones split), so the graphs compiled during the first group serve the whole run."""
        if not self.transformer.compiled:
            return batch
        if self._compiled_batch is None:
            self._compiled_batch = batch
        return self._compiled_batch

    def _swap_latents(self, crops: np.ndarray, id_embed: torch.Tensor, null_id: torch.Tensor, seeds: list[int],
                      conditions: np.ndarray | None) -> torch.Tensor:
        s = self.preset.sampling
        b, height, width = crops.shape[0], crops.shape[1], crops.shape[2]
        tokens = L.encode(self.vae, crops).to(self.dtype)
        cond_tokens = tokens if conditions is None else L.encode(self.vae, conditions).to(self.dtype)
        prompt, pooled, img_ids, txt_ids = self._step_constants(b, height, width)
        cond = FlowCondition(
            prompt_embeds=prompt,
            pooled_embeds=pooled,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=s.guidance,
            condition=cond_tokens,
            id_embed=id_embed.to(self.device, self.dtype).expand(b, -1, -1),
            id_weight=s.id_weight,
        )
        # the null id: IDFormer(zeros) as PuLID and APPLE use it, or no id branch at all (same as id_weight 0)
        null = null_id.to(self.device, self.dtype).expand(b, -1, -1) if s.null_id == "encoder" else None
        # one condition K/V cache for inversion and sampling: the condition tokens never see latents or identity
        cache = ConditionKVCache() if s.condition_cache and self.transformer.config.independent_condition else None
        if s.recipe == "inversion":
            schedule = flux_schedule(s.inversion_steps, tokens.shape[1])
            noise = invert(self._velocity, tokens, cond.attribute_only(null), schedule, s.second_order, cache,
                           s.inversion_solver or s.solver)
        else:
            noise = torch.cat([L.noise_tokens(1, height, width, self.vae, self.vae.config.latent_channels,
                                              torch.Generator().manual_seed(seed)) for seed in seeds]).to(self.device, self.dtype)
        schedule = flux_schedule(s.sampling_steps, tokens.shape[1])
        return sample(self._velocity, noise, cond, schedule, null, s.id_guidance, cache, s.solver)

    def _step_constants(self, batch: int, height: int, width: int) -> tuple[torch.Tensor, ...]:
        """Prompt rows and RoPE ids for a batch size and crop size, the same tensors every call, so the
        transformer reuses its RoPE tables and time embeddings across batches."""
        key = (batch, height, width)
        if key not in self._constants:
            self._constants[key] = (
                self.prompt.prompt_embeds.to(self.device, self.dtype).expand(batch, -1, -1),
                self.prompt.pooled_embeds.to(self.device, self.dtype).expand(batch, -1),
                L.image_ids(height, width, self.vae, self.device, self.dtype),
                self.prompt.txt_ids.to(self.device, self.dtype),
            )
        return self._constants[key]

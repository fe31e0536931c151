"""The training loop shared by the teacher and the student (accelerate; LoRA on the condition branch only).

One readable loop: settings at the top (TrainConfig), a sampler that builds the batch of a given step from
(seed, step) alone, so that a resumed run sees exactly the batches, times and noise it would have seen; one
checkpoint record (LoRA + optimizer + step) that restores everything.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from accelerate import Accelerator
from peft import set_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file
from tqdm import tqdm

from apple_video.config import Preset, load_preset
from apple_video.faces.types import Face
from apple_video.media.paths import atomic_write
from apple_video.models import latents as L
from apple_video.models.lora import ADAPTER, PREFIX, save_lora
from apple_video.models.pipeline import ApplePipeline, PromptEmbeddings, load_prompt_embeddings
from apple_video.models.transformer import TransformerInputs
from apple_video.sampling.flow import FlowCondition, sample
from apple_video.sampling.schedule import flux_schedule
from apple_video.settings import ModelOptions
from apple_video.swappers.base import SourceFace
from apple_video.swappers.presets import apple_files
from apple_video.weights import ModelFiles
from training.arcface import identity_files, identity_loss, identity_net
from training.config import TrainConfig
from training.losses import load_lpips, lpips_files

logger = logging.getLogger(__name__)


@dataclass
class IdentityImage:
    """An aligned crop with what the identity encoder needs."""

    image: np.ndarray
    landmarks: np.ndarray
    embedding: np.ndarray
    key: int  # cache key (data set index)
    kps: np.ndarray | None = None  # (5, 2) ArcFace's points from prepare-data (SCRFD's when present), else from the 68
    eva_kps: np.ndarray | None = None  # (5, 2) EVA-CLIP's points (facexlib RetinaFace's when present), else `kps`

    def source_face(self) -> SourceFace:
        lm = self.landmarks.astype(np.float64)
        from apple_video.faces.align import kps_from_68

        box = np.concatenate([lm.min(0), lm.max(0)])
        kps = np.asarray(self.kps, np.float64) if self.kps is not None else kps_from_68(lm)
        eva = np.asarray(self.eva_kps, np.float64) if self.eva_kps is not None else None
        return SourceFace(self.image, Face(box, kps, 1.0, lm, self.embedding.astype(np.float64)), self.image, lm, eva)


@dataclass
class Batch:
    target: np.ndarray  # (B, S, S, 3) uint8: what the model must produce
    condition: np.ndarray  # (B, S, S, 3) uint8: the attribute image
    identity: list[IdentityImage]  # whose id conditions each sample


class Sampler(Protocol):
    def batch(self, rng: np.random.Generator, size: int) -> Batch: ...


class IdentityCache:
    """Identity tokens per data set image, computed once: EVA-CLIP, ArcFace, parsing and the IDFormer run only for
    an image never seen. At most `capacity` are held on the model's device (~128 KiB each in bf16 at the real size:
    the default 4096 hold ~0.5 GiB); the least recently used is moved to `folder` on disk (one file per image,
    written under a temporary name) and read back from there when it comes again."""

    def __init__(self, capacity: int, folder: Path | None = None, device: torch.device | None = None,
                 writer: bool = True) -> None:
        self.capacity = capacity
        self.folder = folder
        self.device = device
        self.writer = writer  # several processes: only the main one writes to `folder`, all read from it
        self.tokens: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.misses = 0

    def __len__(self) -> int:
        return len(self.tokens)

    def _path(self, key: int) -> Path:
        return self.folder / f"{key}.pt"

    def _load(self, key: int) -> torch.Tensor | None:
        if self.folder is None or not self._path(key).is_file():
            return None
        return torch.load(self._path(key), map_location=self.device or "cpu", weights_only=True)

    def _store(self, key: int, value: torch.Tensor) -> None:
        if self.folder is None or not self.writer or self._path(key).is_file():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(self._path(key)) as tmp:
            torch.save(value.cpu(), tmp)

    def get(self, key: int, compute) -> torch.Tensor:
        if key in self.tokens:
            self.tokens.move_to_end(key)
            return self.tokens[key]
        value = self._load(key)
        if value is None:
            self.misses += 1
            value = compute().detach()
        self.tokens[key] = value
        if len(self.tokens) > self.capacity:
            self._store(*self.tokens.popitem(last=False))
        return value


def training_preset(cfg: TrainConfig) -> Preset:
    """The stage's model preset with the config's condition attention and LoRA rank."""
    preset = load_preset(cfg.preset)
    model = preset.model.model_copy(update={"lora_rank": cfg.lora_rank or preset.model.lora_rank})
    sampling = preset.sampling.model_copy(update={"independent_condition": cfg.independent_condition})
    return preset.model_copy(update={"model": model, "sampling": sampling})


def empty_prompt(pipe: ApplePipeline, seed: int, files: ModelFiles) -> PromptEmbeddings:
    """The empty prompt's embeddings for the text drop: encoded once and cached on disk like the fixed prompt
    (tiny preset: seeded random embeddings of the same shapes); `files`: the pipeline's, as resolved."""
    if pipe.real:
        return load_prompt_embeddings(files("flux-krea-dev"), pipe.device, pipe.dtype, prompt="")
    generator = torch.Generator().manual_seed(seed + 7)
    return PromptEmbeddings(torch.randn(pipe.prompt.prompt_embeds.shape, generator=generator),
                            torch.randn(pipe.prompt.pooled_embeds.shape, generator=generator))


def fp32_lora_params(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Freeze everything but the condition LoRA, whose weights become fp32 master weights whatever the model's
    dtype (peft casts the input to the LoRA dtype and the result back to the layer's)."""
    transformer.requires_grad_(False)
    params = [p for n, p in transformer.named_parameters() if f"lora_A.{ADAPTER}" in n or f"lora_B.{ADAPTER}" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


class Trainer:
    """Owns the model pieces and runs `steps` optimizer steps with checkpoints, sample grids and, with a sampler of
    held-out identities, a validation loss.

    Several processes (`accelerate launch`): each draws its own batches (the process index is part of every draw's
    key), accelerate's DDP averages the gradients, the logged loss is the mean over processes, and only the main
    process writes checkpoints, sample grids, identity tokens, the loss plot and the final LoRA."""

    def __init__(self, cfg: TrainConfig, sampler: Sampler, val_sampler: Sampler | None = None) -> None:
        self.cfg = cfg
        self.sampler = sampler
        self.val_sampler = val_sampler
        self._val_inputs: tuple | None = None
        self.val_history: list[tuple[int, float]] = []
        cuda = torch.cuda.is_available()
        self.accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                                       mixed_precision=cfg.mixed_precision if cuda else "no", cpu=not cuda)
        preset = training_preset(cfg)
        lora = cfg.init_lora or "fresh"
        files = apple_files(preset, ModelOptions(lora=str(lora)))  # each file the models load, checked once here
        id_files = identity_files(cfg.id_loss_model)
        vgg_files = lpips_files(cfg.lpips_backbone) if cfg.lpips_weight > 0 else ModelFiles()
        self.pipe = ApplePipeline.from_preset(preset, self.accelerator.device, lora=lora, files=files, seed=cfg.seed)
        self.transformer = self.pipe.transformer
        logger.info("LoRA initialised from %s", cfg.init_lora or "scratch (B = 0)")
        self.params = fp32_lora_params(self.transformer)
        self.transformer.gradient_checkpointing = cfg.gradient_checkpointing
        self.pipe.vae.requires_grad_(False)
        self.arcface = identity_net(cfg.id_loss_model, id_files, cfg.seed).to(self.accelerator.device).eval()
        self.arcface.requires_grad_(False)
        logger.info("identity loss network: %s", self.arcface.name)
        self.lpips = load_lpips(cfg.lpips_backbone, self.accelerator.device, vgg_files) if cfg.lpips_weight > 0 else None
        self.empty_prompt = empty_prompt(self.pipe, cfg.seed, files)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(self.transformer, self.optimizer)
        self.id_cache = IdentityCache(cfg.id_cache_size, cfg.output / "id_tokens", self.pipe.device,
                                      writer=self.accelerator.is_main_process)
        self.null_id: torch.Tensor | None = None

    # -- pieces ------------------------------------------------------------------------------------------------
    def _embed(self, item: IdentityImage) -> torch.Tensor:
        tokens, null = self.pipe.id_embedding([item.source_face()])
        if self.null_id is None:
            self.null_id = null[0].detach()
        return tokens[0]

    @torch.no_grad()
    def _id_tokens(self, images: list[IdentityImage]) -> torch.Tensor:
        tokens = torch.stack([self.id_cache.get(item.key, lambda item=item: self._embed(item)) for item in images])
        if self.null_id is None:  # every token came from the disk (a resumed run): the null tokens once
            self._embed(images[0])
        return tokens

    def _generator(self, step: int, micro: int) -> tuple[np.random.Generator, torch.Generator]:
        key = [self.cfg.seed, step, micro, self.accelerator.process_index]
        seed = int(np.random.SeedSequence(key).generate_state(1)[0])
        return np.random.default_rng(key), torch.Generator().manual_seed(seed)

    def loss(self, batch: Batch, step: int, rng: np.random.Generator, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        cfg, pipe, device = self.cfg, self.pipe, self.pipe.device
        b, size = batch.target.shape[0], batch.target.shape[1]
        condition = batch.condition.copy()
        condition[rng.random(b) < cfg.drop_condition] = 0  # image drop: black condition (as the official data set)
        x0 = L.encode(pipe.vae, batch.target, gen).to(device).float()
        cond = L.encode(pipe.vae, condition, gen).to(device)
        id_tokens = self._id_tokens(batch.identity).to(device)
        drop_id = torch.as_tensor(rng.random(b) < cfg.drop_id, device=device)
        id_tokens = torch.where(drop_id[:, None, None], self.null_id.to(device).expand_as(id_tokens), id_tokens)
        drop_text = torch.as_tensor(rng.random(b) < cfg.drop_text, device=device)
        prompt, pooled = pipe.prompt.prompt_embeds.to(device), pipe.prompt.pooled_embeds.to(device)
        prompt = torch.where(drop_text[:, None, None], self.empty_prompt.prompt_embeds.to(device), prompt)
        pooled = torch.where(drop_text[:, None], self.empty_prompt.pooled_embeds.to(device), pooled)
        t = torch.sigmoid(torch.randn(b, generator=gen)).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        xt = (1 - t)[:, None, None] * x0 + t[:, None, None] * noise
        dtype = pipe.dtype  # the model's weights: fp32 on a CPU, bf16 for krea-512 on CUDA whatever mixed_precision
        inputs = TransformerInputs(
            latents=xt.to(dtype), timestep=t, prompt_embeds=prompt.to(dtype), pooled_embeds=pooled.to(dtype),
            img_ids=L.image_ids(size, size, pipe.vae, device), txt_ids=pipe.prompt.txt_ids.to(device),
            guidance=torch.ones(b, device=device), condition=cond.to(dtype), id_embed=id_tokens.to(dtype))
        v = self.model(inputs).float()
        mse = ((noise - x0) - v).pow(2).mean(dim=(1, 2))
        total = mse.mean()
        stats = {"mse": total.detach()}  # tensors: the caller reads them (no host sync here)
        # the official trainer computes LPIPS inside its identity-loss block: both start at id_loss_start
        image_terms = step >= cfg.id_loss_start
        use_id = cfg.id_loss_weight > 0 and image_terms
        use_lpips = cfg.lpips_weight > 0 and image_terms
        if not (use_id or use_lpips):  # decided on the host: no device sync on steps without image-space terms
            return total, stats
        near_id = (t <= cfg.id_loss_max_t) & use_id
        near_lpips = (t <= cfg.lpips_max_t) & use_lpips
        near = near_id | near_lpips
        if near.any():  # one decode of the one-step estimate x0_hat = z_t - t v for both image-space terms
            x0_hat = xt[near] - t[near][:, None, None] * v[near]
            pixels = L.decode_latents(pipe.vae, x0_hat, size, size).float()
            picked = np.nonzero(near.cpu().numpy())[0]
            if near_id.any():  # averaged over the samples it applies to
                source = L.to_unit(np.stack([batch.identity[i].image for i in picked])).to(device)
                on = near_id[near]
                id_term = identity_loss(self.arcface, pixels[on], source[on]).mean()
                total = total + cfg.id_loss_weight * id_term
                stats["id"] = id_term.detach()
            if near_lpips.any():
                on = near_lpips[near]
                target = L.to_unit(batch.target[picked]).to(device)
                lpips_term = self.lpips(pixels[on], target[on]).mean()
                total = total + cfg.lpips_weight * lpips_term
                stats["lpips"] = lpips_term.detach()
        return total, stats

    # -- checkpoints -------------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        found = [p for p in self.cfg.output.glob("checkpoint-*") if (p / "state.json").is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def save(self, step: int, history: list[float]) -> Path:
        folder = self.cfg.output / f"checkpoint-{step}"
        with atomic_write(folder) as tmp:
            tmp.mkdir(parents=True)
            save_lora(self.accelerator.unwrap_model(self.model), tmp / f"{ADAPTER}.safetensors", preset=self.cfg.preset)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "losses": history, "val": self.val_history}))
        for old in self.checkpoints()[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def resume(self) -> tuple[int, list[float]]:
        found = self.checkpoints()
        if not found:
            return 0, []
        folder = found[-1]
        state = {k.removeprefix(PREFIX): v for k, v in load_file(str(folder / f"{ADAPTER}.safetensors")).items()}
        set_peft_model_state_dict(self.accelerator.unwrap_model(self.model), state, adapter_name=ADAPTER)
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
        info = json.loads((folder / "state.json").read_text())
        self.val_history = [(int(s), float(v)) for s, v in info.get("val", [])]
        logger.warning("resuming from %s (step %d)", folder, info["step"])
        return info["step"], info["losses"]

    @torch.no_grad()
    def sample_latents(self, steps: int = 4) -> tuple[Batch, torch.Tensor]:
        """A fixed batch and its samples from seeded noise (packed latents, on the model's device)."""
        pipe, device = self.pipe, self.pipe.device
        rng, gen = np.random.default_rng([self.cfg.seed, 10**9]), torch.Generator().manual_seed(self.cfg.seed)
        batch = self.sampler.batch(rng, 2)
        b, size = batch.target.shape[:2]
        prompt = pipe.prompt.to(device)
        cond = FlowCondition(prompt.prompt_embeds.expand(b, -1, -1), prompt.pooled_embeds.expand(b, -1),
                             L.image_ids(size, size, pipe.vae, device), prompt.txt_ids, 1.0,
                             L.encode(pipe.vae, batch.condition), self._id_tokens(batch.identity).to(device))
        noise = torch.randn((b, *L.encode(pipe.vae, batch.target).shape[1:]), generator=gen).to(device)
        model = self.accelerator.unwrap_model(self.model)
        out = sample(lambda inputs, cache: model(inputs, cache), noise, cond, flux_schedule(steps, noise.shape[1], device=device))
        return batch, out

    def sample_grid(self, step: int, steps: int = 4) -> Path:
        """condition | sample from noise | target, one row per sample of a fixed batch."""
        batch, out = self.sample_latents(steps)
        size = batch.target.shape[1]
        images = L.decode(self.pipe.vae, out, size, size)
        grid = np.concatenate([np.concatenate([c, o, t], axis=1) for c, o, t in zip(batch.condition, images, batch.target, strict=True)])
        path = self.cfg.output / "samples" / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        return path

    # -- validation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self) -> float:
        """The flow loss on a fixed batch of held-out identities, at each t of `val_t` with fixed noise and fixed
        latent draws, no drops: the same inputs at every validation, so only the LoRA changes the number."""
        cfg, pipe, device = self.cfg, self.pipe, self.pipe.device
        if self._val_inputs is None:
            batch = self.val_sampler.batch(np.random.default_rng([cfg.seed, 2**31 - 1]), cfg.val_samples)
            gen = torch.Generator().manual_seed(cfg.seed + 2**20)
            x0 = L.encode(pipe.vae, batch.target, gen).to(device).float()
            cond = L.encode(pipe.vae, batch.condition, gen).to(device)
            noise = torch.randn((len(cfg.val_t), *x0.shape), generator=gen).to(device)
            self._val_inputs = (batch.target.shape[1], x0, cond, self._id_tokens(batch.identity).to(device), noise)
        size, x0, cond, ids, noise = self._val_inputs
        b, dtype = x0.shape[0], pipe.dtype
        model = self.accelerator.unwrap_model(self.model)  # main process only: no DDP collective
        losses = []
        for k, value in enumerate(cfg.val_t):
            t = torch.full((b,), value, device=device)
            xt = (1 - value) * x0 + value * noise[k]
            inputs = TransformerInputs(
                latents=xt.to(dtype), timestep=t, prompt_embeds=pipe.prompt.prompt_embeds.to(device, dtype).expand(b, -1, -1),
                pooled_embeds=pipe.prompt.pooled_embeds.to(device, dtype).expand(b, -1),
                img_ids=L.image_ids(size, size, pipe.vae, device), txt_ids=pipe.prompt.txt_ids.to(device),
                guidance=torch.ones(b, device=device), condition=cond.to(dtype), id_embed=ids.to(dtype))
            losses.append(((noise[k] - x0) - model(inputs).float()).pow(2).mean())
        return float(torch.stack(losses).mean())

    def plot_losses(self, history: list[float]) -> Path:
        """<output>/loss.png: the training loss per step (and its running mean) with the validation loss."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        steps = np.arange(1, len(history) + 1)
        axes.plot(steps, history, color="0.75", linewidth=0.8, label="training (per step)")
        window = max(1, len(history) // 50)
        if len(history) >= window:
            axes.plot(steps[window - 1 :], np.convolve(history, np.ones(window) / window, "valid"), label=f"training (mean of {window})")
        if self.val_history:
            axes.plot(*zip(*self.val_history, strict=True), "o-", label="validation (held-out identities)")
        axes.set(xlabel="step", ylabel="loss", title=f"{self.cfg.stage}: {self.cfg.output.name}")
        axes.set_yscale("log")
        axes.legend()
        path = self.cfg.output / "loss.png"
        with atomic_write(path) as tmp:
            figure.savefig(tmp)
        return path

    # -- the loop ----------------------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> Path:
        cfg = self.cfg
        cfg.output.mkdir(parents=True, exist_ok=True)
        start, history = self.resume()
        self.model.train()
        end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
        with tqdm(range(start, end), desc=f"train {cfg.stage}", unit="step", initial=start, total=cfg.steps, disable=None) as bar:
            for step in bar:
                step_loss = 0.0
                for micro in range(cfg.grad_accum):
                    with self.accelerator.accumulate(self.model):
                        rng, gen = self._generator(step, micro)
                        loss, stats = self.loss(self.sampler.batch(rng, cfg.batch_size), step, rng, gen)
                        self.accelerator.backward(loss)
                        if self.accelerator.sync_gradients:
                            self.accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad()
                    step_loss += float(loss.detach()) / cfg.grad_accum
                if self.accelerator.num_processes > 1:  # the mean over processes (one per process otherwise)
                    step_loss = float(self.accelerator.reduce(torch.tensor([step_loss], device=self.pipe.device), "mean")[0])
                history.append(step_loss)
                done = step + 1
                main = self.accelerator.is_main_process  # one writer; the others wait for it
                if self.val_sampler is not None and main and (done % cfg.val_every == 0 or done == cfg.steps):
                    self.val_history.append((done, self.validation_loss()))
                    logger.info("step %d: training loss %.4f, validation loss %.4f", done, step_loss, self.val_history[-1][1])
                    self.plot_losses(history)
                val = {"val": f"{self.val_history[-1][1]:.4f}"} if self.val_history else {}
                bar.set_postfix(loss=f"{step_loss:.4f}", **val, **{k: f"{float(v):.3f}" for k, v in stats.items()})
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    if main:
                        self.save(done, history)
                    self.accelerator.wait_for_everyone()
                if done % cfg.sample_every == 0 and main:
                    self.sample_grid(done)
        final = cfg.output / f"{ADAPTER}.safetensors"
        if end == cfg.steps and self.accelerator.is_main_process:
            save_lora(self.accelerator.unwrap_model(self.model), final, preset=cfg.preset)
        self.history = history
        return final

"""Write stand-in checkpoints in each real checkpoint's published layout and key names, at reduced size, under a
weights home (`APPLE_VIDEO_HOME` layout), so the real loaders run end to end on a CPU without the real files:

- FLUX.1-Krea-dev as diffusers lays it out: model_index.json, scheduler/, transformer/ (config + two
  safetensors shards + diffusion_pytorch_model.safetensors.index.json), vae/, text_encoder/ (CLIP) and
  text_encoder_2/ (T5) with their tokenizers (CLIP vocab.json + merges.txt; T5 as a tokenizer.json), built
  offline with the `tokenizers` library;
- PuLID-FLUX v0.9.1: one safetensors with `pulid_encoder.*` (IDFormer) and `pulid_ca.<i>.*` (20 cross-attentions);
- EVA02-CLIP-L-14-336 as EVA-CLIP's own .pt: a state dict with `visual.*` keys (EVA-CLIP names: q_bias,
  inner_attn_ln, mlp.w1/w2/w3, ffn_ln) and a few `text.*` keys beside;
- insightface antelopev2 ArcFace (glintr100.onnx): an ONNX graph 1x3x112x112 -> 512;
- the APPLE LoRA as the official trainer saves it: bf16, `transformer.`-prefixed peft keys of OminiControl's
  target modules, metadata {"format": "pt"}; written outside the catalogue path (its published size is pinned);
- HopeNet (hopenet_robust_alpha1.pkl): a torch-saved state dict with torchvision ResNet key names (one bottleneck
  per stage, a quarter of the inner width) and the 66-bin heads `fc_yaw`, `fc_pitch`, `fc_roll` + `fc_finetune`;
  below the catalogue's smallest real size, so `weights check` calls it corrupt until a test relaxes the entry.

Every value is seeded random: a swap with these is no real swap. Real sizes are the published ones.

    python scripts/make_standins.py HOME
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safetensors.torch import save_file  # noqa: E402

from apple_video import weights  # noqa: E402

TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=3, num_single_layers=5, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                   axes_dims_rope=[4, 6, 6])
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 16, 16, 16], layers_per_block=1,
           latent_channels=16, norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
           use_post_quant_conv=False, sample_size=1024)
EVA = dict(img_size=56, embed_dim=64, depth=6, num_heads=1, num_classes=32)  # EVA02-L: 336, 1024, 24, 16, 768
ARCFACE_DIM = 512
PULID = dict(ca_dim_head=128, ca_heads=1, idformer_dim=64, idformer_depth=5, idformer_dim_head=64, idformer_heads=1,
             num_queries=32, num_id_token=5, kv_dim=32)
LORA_RANK = 4
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
             "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
             "use_dynamic_shifting": True}
MODEL_INDEX = {"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0.dev0",
               "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
               "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
               "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"],
               "vae": ["diffusers", "AutoencoderKL"]}
WORDS = ("a", "photo", "of", "human", "face")


@dataclass
class Standins:
    home: Path
    flux: Path
    pulid: Path
    eva: Path
    arcface: Path
    lora: Path
    hopenet: Path | None = None


def _json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _seeded_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        if value.is_floating_point():
            noise = torch.randn(value.shape, generator=generator) * 0.05
            value = noise + (1.0 if value.ndim == 1 and key.endswith("weight") and "norm" in key else 0.0)
        state[key] = value.contiguous()
    return state


# -- FLUX folder ---------------------------------------------------------------------------------------------------
def write_transformer(folder: Path, seed: int) -> None:
    """Two shards and the index json, as diffusers' save_pretrained(max_shard_size=...) lays them out."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**TRANSFORMER)
    state = _seeded_state(model, seed)
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:]}
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: state[k].to(torch.bfloat16) for k in shard_keys}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard_keys})
    total = sum(state[k].numel() * 2 for k in keys)
    _json(folder / "diffusion_pytorch_model.safetensors.index.json",
          {"metadata": {"total_size": total}, "weight_map": weight_map})
    _json(folder / "config.json", {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0.dev0",
                                   **TRANSFORMER})


def write_vae(folder: Path, seed: int) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(**VAE).save_pretrained(str(folder))


def _clip_vocab() -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary in CLIP's format (`</w>` word ends) with merges that spell the prompt's words."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            if pieces[0] not in vocab_list:
                vocab_list.append(pieces[0])
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab_list)}, list(dict.fromkeys(merges))


def write_clip(encoder_dir: Path, tokenizer_dir: Path, seed: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, merges = _clip_vocab()
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    _json(tokenizer_dir / "tokenizer_config.json", {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                                    "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                                                    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                                                    "do_lower_case": True})
    _json(tokenizer_dir / "special_tokens_map.json", {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                                                      "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=TRANSFORMER["pooled_projection_dim"], intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"])
    CLIPTextModel(config).save_pretrained(str(encoder_dir))


def write_t5(encoder_dir: Path, tokenizer_dir: Path, seed: int) -> None:
    """T5's tokenizer as a tokenizer.json (Unigram + Metaspace, as T5TokenizerFast saves it), no sentencepiece."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in WORDS] + [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Replace(" {2,}", " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(tokenizer_dir / "tokenizer.json"))
    _json(tokenizer_dir / "tokenizer_config.json", {"tokenizer_class": "T5Tokenizer", "model_max_length": 512,
                                                    "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                                                    "extra_ids": 0})
    _json(tokenizer_dir / "special_tokens_map.json", {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(pieces), d_model=TRANSFORMER["joint_attention_dim"], d_kv=16, d_ff=64, num_layers=2,
                      num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1)
    T5EncoderModel(config).save_pretrained(str(encoder_dir))


def write_flux(folder: Path, seed: int = 0) -> Path:
    write_transformer(folder / "transformer", seed)
    write_vae(folder / "vae", seed + 1)
    write_clip(folder / "text_encoder", folder / "tokenizer", seed + 2)
    write_t5(folder / "text_encoder_2", folder / "tokenizer_2", seed + 3)
    _json(folder / "scheduler" / "scheduler_config.json", {**SCHEDULER, "_diffusers_version": "0.30.0.dev0"})
    _json(folder / "model_index.json", MODEL_INDEX)
    return folder


# -- PuLID, EVA-CLIP, ArcFace --------------------------------------------------------------------------------------
def write_pulid(path: Path, seed: int = 10) -> Path:
    """PuLID-FLUX v0.9.1 key names: `pulid_encoder.*` (IDFormer) + `pulid_ca.0..19.*` (PerceiverAttentionCA)."""
    from apple_video.models.pulid import IDFormer, PerceiverAttentionCA

    p = PULID
    torch.manual_seed(seed)
    encoder = IDFormer(dim=p["idformer_dim"], depth=p["idformer_depth"], dim_head=p["idformer_dim_head"],
                       heads=p["idformer_heads"], num_id_token=p["num_id_token"], num_queries=p["num_queries"],
                       output_dim=p["kv_dim"], id_dim=ARCFACE_DIM + EVA["num_classes"], vit_dim=EVA["embed_dim"])
    inner = TRANSFORMER["attention_head_dim"] * TRANSFORMER["num_attention_heads"]
    state = {f"pulid_encoder.{k}": v for k, v in _seeded_state(encoder, seed).items()}
    for i in range(20):
        ca = PerceiverAttentionCA(dim=inner, dim_head=p["ca_dim_head"], heads=p["ca_heads"], kv_dim=p["kv_dim"])
        state.update({f"pulid_ca.{i}.{k}": v for k, v in _seeded_state(ca, seed + 1 + i).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(path))
    return path


TIMM_TO_EVA_CLIP = (("mlp.norm", "mlp.ffn_ln"), ("attn.norm", "attn.inner_attn_ln"), ("mlp.fc1_g", "mlp.w1"),
                    ("mlp.fc1_x", "mlp.w2"), ("mlp.fc2", "mlp.w3"), ("q_proj.bias", "q_bias"), ("v_proj.bias", "v_bias"))


def write_eva(path: Path, seed: int = 40) -> Path:
    """EVA-CLIP's own checkpoint layout (what `QuanSun/EVA-CLIP` publishes): a torch-saved state dict of the whole
    CLIP model, the vision tower under `visual.` with EVA-CLIP's parameter names."""
    import timm

    from apple_video.models.real_identity import EVA_ARCH

    torch.manual_seed(seed)
    model = timm.create_model(EVA_ARCH, pretrained=False, **EVA)
    state = {}
    for key, value in _seeded_state(model, seed).items():
        if "rope" in key:
            continue
        for ours, theirs in TIMM_TO_EVA_CLIP:
            key = key.replace(ours, theirs)
        state[f"visual.{key}"] = value
    generator = torch.Generator().manual_seed(seed + 1)
    state["text.token_embedding.weight"] = torch.randn(16, 8, generator=generator)
    state["logit_scale"] = torch.tensor(4.6052)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, str(path))
    return path


def write_arcface(path: Path, seed: int = 50) -> Path:
    """An ONNX graph with insightface's ArcFace interface: input 1x3x112x112 (BGR, (x - 127.5) / 127.5), output
    a 512-d embedding (4x4 pooling, then a seeded projection)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    pooled = 3 * 28 * 28
    weight = numpy_helper.from_array((rng.normal(size=(pooled, ARCFACE_DIM)) / pooled**0.5).astype(np.float32), "proj")
    bias = numpy_helper.from_array(rng.normal(size=(ARCFACE_DIM,)).astype(np.float32), "bias")
    mean = numpy_helper.from_array(np.array([127.5], np.float32), "mean")
    scale = numpy_helper.from_array(np.array([1 / 127.5], np.float32), "scale")
    nodes = [helper.make_node("Sub", ["input.1", "mean"], ["centred"]), helper.make_node("Mul", ["centred", "scale"], ["x"]),
             helper.make_node("AveragePool", ["x"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]), helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "proj", "bias"], ["683"])]
    graph = helper.make_graph(nodes, "arcface_standin",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
                              [helper.make_tensor_value_info("683", TensorProto.FLOAT, [1, ARCFACE_DIM])],
                              initializer=[weight, bias, mean, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_lora(path: Path, seed: int = 60) -> Path:
    """As the official trainer saves it (FluxPipeline.save_lora_weights of get_peft_model_state_dict): bf16,
    `transformer.<module>.lora_A/B.weight`, safetensors metadata {"format": "pt"}."""
    from peft import get_peft_model_state_dict

    from apple_video.models.lora import add_condition_lora
    from apple_video.models.transformer import AppleFluxTransformer

    torch.manual_seed(seed)
    model = AppleFluxTransformer(**TRANSFORMER)
    add_condition_lora(model, LORA_RANK, init="gaussian")
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in get_peft_model_state_dict(model, adapter_name="default").items():
        if "lora_B" in key:  # trained: B is no longer zero
            value = torch.randn(value.shape, generator=generator) * 0.05
        state[f"transformer.{key}"] = value.to(torch.bfloat16).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})
    return path


HOPENET = dict(blocks=(1, 1, 1, 1), width=16)  # the real one: (3, 4, 6, 3), 64


def write_hopenet(path: Path, seed: int = 70) -> Path:
    """HopeNet's published checkpoint layout: a pickled state dict of a torchvision ResNet trunk (no `fc`), the three
    66-bin heads and the vestigial `fc_finetune`, float32."""
    from apple_video.evaluate.pose import HopeNet

    torch.manual_seed(seed)
    net = HopeNet(HOPENET["blocks"], width=HOPENET["width"])
    state = _seeded_state(net, seed)
    for key in [k for k in state if k.endswith("running_var")]:  # batch norms as trained ones hold them
        state[key] = torch.ones_like(state[key])
        state[key.replace("running_var", "running_mean")] = torch.zeros_like(state[key])
        state[key.replace("running_var", "weight")] = state[key.replace("running_var", "weight")] + 1.0
    generator = torch.Generator().manual_seed(seed + 1)
    for head in ("fc_yaw", "fc_pitch", "fc_roll"):  # heads that answer differently for different faces
        state[f"{head}.weight"] = torch.randn(state[f"{head}.weight"].shape, generator=generator) * 2.0
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, str(path))
    return path


def write_standins(home: Path) -> Standins:
    """Everything under `home`, at the catalogue's relative paths (the LoRA under `standin/`: see above)."""
    def at(name: str) -> Path:
        return home / weights.lookup(name).relpath

    return Standins(
        home=home,
        flux=write_flux(at("flux-krea-dev")),
        pulid=write_pulid(at("pulid-flux-v0.9.1")),
        eva=write_eva(at("eva02-clip-l-336")),
        arcface=write_arcface(at("antelopev2-arcface")),
        lora=write_lora(home / "standin" / "student" / "default.safetensors"),
        hopenet=write_hopenet(at("hopenet-robust-alpha1")),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("home", type=Path, help="weights home to write into (point APPLE_VIDEO_HOME at it)")
    args = parser.parse_args(argv)
    made = write_standins(args.home)
    print(f"stand-ins written under {made.home}; LoRA at {made.lora} (pass it with --lora)")


if __name__ == "__main__":
    main()

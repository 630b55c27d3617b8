"""Full-size pipelines with random weights: FLUX.1-dev and SD3.5-large as published, written shard by shard.

`write_fullsize("flux-dev", DIR)` writes a diffusers pipeline directory with the published configs
(FLUX.1-dev: 19 double + 38 single blocks, 24 heads x 128, T5-v1.1-XXL, CLIP-L, the 16-channel VAE;
SD3.5-large: 38-layer MMDiT with 38 heads x 64 and qk RMS norm, CLIP-L, CLIP-G, T5-v1.1-XXL, the SD3
VAE). Models are built on the meta device (no weights in memory) and every parameter is drawn, in bf16,
straight into sharded safetensors with an index json, as checkpoints ship: normal(0, 0.02) weights,
norm scales 1, biases 0, seeded per parameter name. Peak memory is one tensor. The tokenizers are the
presets' small trained ones (their ids fit the real vocabularies).

Nothing is downloaded; this is for measuring export and build at the size people ship
(benchmarks/fullsize.py), not for generating images.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from latentrt.errors import InputError

SHARD_BYTES = 5 * 10**9  # diffusers' and transformers' default max_shard_size ("5GB")

_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
_CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
               max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
_T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
               relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6, tie_word_embeddings=False)
_VAE_16 = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32,
               use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)

PIPELINES: dict[str, dict[str, Any]] = {
    "flux-dev": {
        "class": "FluxPipeline",
        "models": {
            "transformer": ("diffusers", "FluxTransformer2DModel", dict(
                patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])),
            "text_encoder": ("transformers", "CLIPTextModel", _CLIP_L),
            "text_encoder_2": ("transformers", "T5EncoderModel", _T5_XXL),
            "vae": ("diffusers", "AutoencoderKL", dict(_VAE_16, scaling_factor=0.3611, shift_factor=0.1159)),
        },
        "scheduler": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        "tokenizers": {"tokenizer": ("clip", 77), "tokenizer_2": ("t5", 512)},
    },
    "sd35-large": {
        "class": "StableDiffusion3Pipeline",
        "models": {
            "transformer": ("diffusers", "SD3Transformer2DModel", dict(
                sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
                joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
                pos_embed_max_size=192, qk_norm="rms_norm")),
            "text_encoder": ("transformers", "CLIPTextModelWithProjection", _CLIP_L),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", _CLIP_G),
            "text_encoder_3": ("transformers", "T5EncoderModel", _T5_XXL),
            "vae": ("diffusers", "AutoencoderKL", dict(_VAE_16, scaling_factor=1.5305, shift_factor=0.0609)),
        },
        "scheduler": dict(shift=3.0),
        "tokenizers": {"tokenizer": ("clip", 77), "tokenizer_2": ("clip", 77), "tokenizer_3": ("t5", 256)},
    },
}


def build_meta(library: str, class_name: str, config: dict[str, Any]):
    """The model with the given config, its parameters on the meta device (no memory)."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    cls = getattr({"diffusers": diffusers, "transformers": transformers}[library], class_name)
    with init_empty_weights(include_buffers=False):
        if library == "diffusers":
            return cls.from_config(config)
        config_cls = transformers.CLIPTextConfig if class_name.startswith("CLIP") else transformers.T5Config
        model = cls._from_config(config_cls(**config))
    if library == "transformers":
        model.tie_weights()
    return model


def initial_value(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The parameter's value in float32: 1 for norm scales, 0 for biases, else normal(0, 0.02),
    seeded by the parameter's name (so a shard's content does not depend on the order of writing)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return np.zeros(shape, np.float32)
    if len(shape) == 1 and ("norm" in name or leaf in ("scale", "gamma")):
        return np.ones(shape, np.float32)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)


def write_safetensors_shards(folder: Path, stem: str, tensors: list[tuple[str, tuple[int, ...]]], make, *, shard_bytes: int = SHARD_BYTES) -> int:
    """Write `tensors` (name, shape) as bf16 safetensors shards `stem-0000k-of-0000n.safetensors` plus
    `stem.safetensors.index.json` (one `stem.safetensors` when they fit in one shard); `make(name,
    shape)` gives each float32 value, one at a time. Returns the bytes written."""
    import ml_dtypes

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    names = [f"{stem}.safetensors"] if len(shards) == 1 else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for file, shard in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            nbytes = math.prod(shape) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / file, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in shard:
                f.write(make(name, shape).astype(ml_dtypes.bfloat16).tobytes())
        total += 8 + len(raw) + offset
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(math.prod(s) * 2 for _, s in tensors)}, "weight_map": weight_map}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def _parameters(model) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Each stored tensor once (tied parameters under their first name), with persistent buffers."""
    seen = set()
    for name, tensor in model.named_parameters():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield name, tuple(tensor.shape)


def write_fullsize(name: str, directory: str | os.PathLike, *, seed: int = 0, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write pipeline `name` ("flux-dev" or "sd35-large") with random bf16 weights into `directory`.

    Raises:
        InputError: an unknown name.
    """
    if name not in PIPELINES:
        raise InputError(f"unknown full-size pipeline {name!r}; choose one of {', '.join(PIPELINES)}")
    return write_pipeline(PIPELINES[name], directory, seed=seed, shard_bytes=shard_bytes)


def write_pipeline(spec: dict[str, Any], directory: str | os.PathLike, *, seed: int = 0, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a pipeline described like the entries of PIPELINES (class, models with configs,
    scheduler config, tokenizers) with random bf16 weights into `directory`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from latentrt.models.tokenizers import clip_bpe, save_tokenizer, t5_unigram

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": spec["class"], "_diffusers_version": "0.35.0"}
    for component, (library, class_name, config) in spec["models"].items():
        folder = directory / component
        folder.mkdir(exist_ok=True)
        model = build_meta(library, class_name, config)
        if library == "diffusers":
            model.save_config(folder)
            stem = "diffusion_pytorch_model"
        else:
            model.config.save_pretrained(folder)
            stem = "model"
        write_safetensors_shards(folder, stem, list(_parameters(model)), lambda n, s: initial_value(n, s, seed), shard_bytes=shard_bytes)
        index[component] = [library, class_name]
        del model
    FlowMatchEulerDiscreteScheduler(**spec["scheduler"]).save_pretrained(directory / "scheduler")
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    for folder, (kind, max_length) in spec["tokenizers"].items():
        tok, config = clip_bpe(max_length=max_length) if kind == "clip" else t5_unigram(max_length=max_length)
        save_tokenizer(tok, config, directory / folder)
        index[folder] = ["transformers", "TokenizersBackend"]
    (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return directory


def parameter_count(name: str) -> dict[str, int]:
    """Parameters per model of pipeline `name` (from the meta models)."""
    return {
        component: sum(math.prod(s) for _, s in _parameters(build_meta(library, class_name, config)))
        for component, (library, class_name, config) in PIPELINES[name]["models"].items()
    }

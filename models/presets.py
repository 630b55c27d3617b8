"""Built-in tiny pipelines: the real diffusers/transformers classes with small configs and seeded random weights.

`save_preset("tiny-sd3", DIR)` writes a diffusers-format pipeline directory (model_index.json,
component folders with config.json + safetensors, tokenizer.json) that
`diffusers.StableDiffusion3Pipeline.from_pretrained(DIR)` loads. Exporting a preset goes through
that directory, so presets and user checkpoints share one code path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from latentrt.errors import InputError
from latentrt.models.tokenizers import clip_bpe, save_tokenizer, t5_unigram


def _tiny_sd3(directory: Path, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast, T5Config, T5EncoderModel

    clip_tok, clip_cfg = clip_bpe(max_length=77)
    t5_tok, t5_cfg = t5_unigram()
    for sub, (tok, cfg) in {"tokenizer": (clip_tok, clip_cfg), "tokenizer_2": (clip_tok, clip_cfg), "tokenizer_3": (t5_tok, t5_cfg)}.items():
        save_tokenizer(tok, cfg, directory / sub)

    def clip(hidden: int, projection: int) -> CLIPTextModelWithProjection:
        config = CLIPTextConfig(
            vocab_size=clip_tok.get_vocab_size(),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            projection_dim=projection,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=clip_tok.token_to_id("<|startoftext|>"),
            eos_token_id=clip_tok.token_to_id("<|endoftext|>"),
            pad_token_id=clip_tok.token_to_id("<|endoftext|>"),
        )
        return CLIPTextModelWithProjection(config)

    torch.manual_seed(seed)
    text_encoder = clip(hidden=32, projection=32)
    text_encoder_2 = clip(hidden=48, projection=48)
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=t5_tok.get_vocab_size(),
            d_model=96,
            d_kv=16,
            d_ff=192,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=96,
        caption_projection_dim=64,
        pooled_projection_dim=80,
        pos_embed_max_size=48,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=128,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=PreTrainedTokenizerFast.from_pretrained(directory / "tokenizer"),
        text_encoder_2=text_encoder_2,
        tokenizer_2=PreTrainedTokenizerFast.from_pretrained(directory / "tokenizer_2"),
        text_encoder_3=text_encoder_3,
        tokenizer_3=PreTrainedTokenizerFast.from_pretrained(directory / "tokenizer_3"),
    )
    pipe.save_pretrained(directory, safe_serialization=True)


PRESETS: dict[str, Callable[[Path, int], None]] = {"tiny-sd3": _tiny_sd3}


def save_preset(name: str, directory: str | os.PathLike, *, seed: int = 0) -> Path:
    """Build preset `name` with weights drawn from `seed` and save it as a diffusers pipeline directory."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; the built-in presets are: {', '.join(sorted(PRESETS))}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    PRESETS[name](directory, seed)
    return directory

"""Small configs of the real text-encoder and VAE classes, shared by the tiny presets of every family."""

from __future__ import annotations

from tokenizers import Tokenizer


def tiny_clip(tok: Tokenizer, *, hidden: int, projection: int | None = None, layers: int = 3):
    """A CLIPTextModel (or CLIPTextModelWithProjection when `projection` is set) over a clip_bpe tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection or hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=tok.token_to_id("<|startoftext|>"),
        eos_token_id=tok.token_to_id("<|endoftext|>"),
        pad_token_id=tok.token_to_id("<|endoftext|>"),
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def tiny_t5(tok: Tokenizer, *, d_model: int, d_kv: int = 16, layers: int = 2):
    """A T5EncoderModel (gated-GELU, as T5 v1.1 / T5-XXL) over a t5_unigram tokenizer."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=tok.get_vocab_size(),
            d_model=d_model,
            d_kv=d_kv,
            d_ff=2 * d_model,
            num_layers=layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def tiny_vae(*, channels: tuple[int, ...], latent_channels: int, sample_size: int, scaling_factor: float, shift_factor: float | None = None):
    """An AutoencoderKL with len(channels) levels (2 ** (levels - 1) downsampling)."""
    from diffusers import AutoencoderKL

    extra = {} if shift_factor is None else {"shift_factor": shift_factor, "use_quant_conv": False, "use_post_quant_conv": False}
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        **extra,
    )

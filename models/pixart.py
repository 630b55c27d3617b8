"""PixArt-alpha / PixArt-sigma: a T5 encoder with attention mask, PixArtTransformer2DModel, the configured scheduler.

The transformer's output carries a learned variance: `out_channels = 2 * in_channels`, and the
pipeline keeps the first half (runtime/families/pixart.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentrt.models.loader import LoadedPipeline
from latentrt.models.spec import ComponentExport, FamilyExport, TensorTemplate, scheduler_entry
from latentrt.models.vae import latent_spec, vae_decoder_export
from latentrt.models.tiny import tiny_t5, tiny_vae
from latentrt.models.tokenizers import save_tokenizer, t5_unigram
from latentrt.bundle.manifest import AxisRange, Defaults

REQUIRED = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
OPTIONAL = ()


class T5MaskedEncoderAdapter(torch.nn.Module):
    """input_ids, attention_mask [batch, sequence] int64 -> last_hidden_state [batch, sequence, d_model]."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids, attention_mask=attention_mask)[0]


class PixArtTransformerAdapter(torch.nn.Module):
    """hidden_states [b, c, h, w], encoder_hidden_states [b, L, caption_channels], encoder_attention_mask [b, L]
    float32 (1 keep, 0 drop), timestep [b] (, resolution [b, 2], aspect_ratio [b, 1] at 1024 px) -> sample
    [b, 2c, h, w] (noise and learned variance)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, hidden_states, encoder_hidden_states, encoder_attention_mask, timestep, resolution=None, aspect_ratio=None):
        return self.model(
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            timestep=timestep,
            added_cond_kwargs={"resolution": resolution, "aspect_ratio": aspect_ratio},
            return_dict=False,
        )[0]


def pixart_export(pipe: LoadedPipeline, *, max_batch: int = 4, max_sequence_length: int = 120) -> FamilyExport:
    """Describe a PixArt pipeline's components. `max_sequence_length`: T5 length (120 alpha, 300 sigma)."""
    c = pipe.components
    transformer, vae, t5 = c["transformer"], c["vae"], c["text_encoder"]
    tcfg = transformer.config
    seq = max_sequence_length or 120
    batch = AxisRange(1, 2, 2 * max_batch)
    text_axis = AxisRange(1, seq, max(seq, 512))
    vae_scale = latent_spec(vae).vae_scale_factor
    patch, sample = tcfg.patch_size, tcfg.sample_size
    latent_axis = AxisRange(2 * patch, sample, 4 * sample, multiple_of=patch)
    odd = 3 * patch
    extra = tcfg.sample_size == 128  # diffusers conditions PixArt-alpha 1024 on resolution and aspect ratio
    inputs = [
        TensorTemplate("hidden_states", ("batch", tcfg.in_channels, "latent_height", "latent_width")),
        TensorTemplate("encoder_hidden_states", ("batch", "sequence", tcfg.caption_channels)),
        TensorTemplate("encoder_attention_mask", ("batch", "sequence"), "float32", 1.0, 1.0),
        TensorTemplate("timestep", ("batch",), "float32", 0.0, 1000.0),
    ]
    if extra:
        inputs += [TensorTemplate("resolution", ("batch", 2), "float32", 256.0, 2048.0), TensorTemplate("aspect_ratio", ("batch", 1), "float32", 0.25, 4.0)]
    components = [
        ComponentExport(
            name="text_encoder",
            module=T5MaskedEncoderAdapter(t5),
            inputs=(
                TensorTemplate("input_ids", ("batch", "sequence"), "int64", 0, t5.config.vocab_size),
                TensorTemplate("attention_mask", ("batch", "sequence"), "int64", 1, 2),
            ),
            outputs=(TensorTemplate("last_hidden_state", ("batch", "sequence", t5.config.d_model)),),
            axes={"batch": batch, "sequence": text_axis},
            trace_sizes={"batch": 2, "sequence": 16},
            validate_sizes=({"batch": 1, "sequence": seq}, {"batch": 2, "sequence": 24}),
            blocks=("encoder.block",),
        ),
        ComponentExport(
            name="transformer",
            module=PixArtTransformerAdapter(transformer),
            inputs=tuple(inputs),
            outputs=(TensorTemplate("sample", ("batch", tcfg.out_channels, "latent_height", "latent_width")),),
            axes={"batch": batch, "latent_height": latent_axis, "latent_width": latent_axis, "sequence": text_axis},
            # Trace away from sample_size: the patch embedding recomputes its positions for other sizes.
            trace_sizes={"batch": 2, "latent_height": sample + patch, "latent_width": sample + patch, "sequence": 8},
            validate_sizes=(
                {"batch": 1, "latent_height": sample, "latent_width": sample, "sequence": seq},
                {"batch": 2, "latent_height": odd, "latent_width": 2 * odd, "sequence": 5},
            ),
            blocks=("transformer_blocks",),
        ),
        vae_decoder_export(vae, max_batch=max_batch, latent_axis=latent_axis, validate_latent=sample),
    ]
    scheduler = c["scheduler"]
    return FamilyExport(
        family="pixart",
        components=components,
        tokenizers={"tokenizer": (c["tokenizer"], seq)},
        latent=latent_spec(vae),
        scheduler=scheduler_entry(scheduler),
        defaults=Defaults(height=sample * vae_scale, width=sample * vae_scale, num_inference_steps=20, guidance_scale=4.5, max_sequence_length=seq),
        conditioning={
            "t5_encoder": ["text_encoder", "tokenizer"],
            "learned_sigma": tcfg.out_channels == 2 * tcfg.in_channels,
            "resolution_conditioning": extra,
        },
    )


def build_tiny(directory: Path, seed: int) -> None:
    """tiny-pixart: the real PixArt classes (T5EncoderModel, PixArtTransformer2DModel with learned sigma,
    AutoencoderKL), small configs, a DDIM scheduler."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import PreTrainedTokenizerFast

    t5_tok, t5_cfg = t5_unigram()
    save_tokenizer(t5_tok, t5_cfg, directory / "tokenizer")
    torch.manual_seed(seed)
    text_encoder = tiny_t5(t5_tok, d_model=32, d_kv=8)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    vae = tiny_vae(channels=(8, 8, 16, 16), latent_channels=4, sample_size=64, scaling_factor=0.18215)
    scheduler = DDIMScheduler(
        beta_schedule="linear", beta_start=0.0001, beta_end=0.02, timestep_spacing="leading", steps_offset=1, clip_sample=False
    )
    PixArtAlphaPipeline(
        tokenizer=PreTrainedTokenizerFast.from_pretrained(directory / "tokenizer"),
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
    ).save_pretrained(directory, safe_serialization=True)

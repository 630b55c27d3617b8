"""Flux.1 (dev and schnell): CLIP-L pooled + T5 conditioning, a packed-latent MMDiT, flow matching with dynamic shift.

The denoiser works on packed latents: 2x2 patches of the 16-channel latent flattened into tokens,
`hidden_states` [b, (h/2)(w/2), 64], with position ids `img_ids` [(h/2)(w/2), 3] and `txt_ids`
[seq, 3]. Guidance-distilled models (dev) take `guidance` [b] instead of a classifier-free batch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentrt.models.loader import LoadedPipeline
from latentrt.models.sd3 import T5EncoderAdapter
from latentrt.models.spec import ComponentExport, FamilyExport, TensorTemplate, scheduler_entry
from latentrt.models.vae import latent_spec, vae_decoder_export
from latentrt.models.tiny import tiny_clip, tiny_t5, tiny_vae
from latentrt.models.tokenizers import clip_bpe, save_tokenizer, t5_unigram
from latentrt.bundle.manifest import AxisRange, Defaults

REQUIRED = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
OPTIONAL = ()


class CLIPPooledAdapter(torch.nn.Module):
    """input_ids [batch, sequence] int64 -> pooler_output [batch, hidden] (CLIPTextModel, no projection)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids, output_hidden_states=False).pooler_output


class FluxTransformerAdapter(torch.nn.Module):
    """hidden_states [b, n, 64], encoder_hidden_states [b, seq, joint_dim], pooled_projections [b, 768],
    timestep [b] (sigma, in [0, 1]), img_ids [n, 3], txt_ids [seq, 3] (, guidance [b]) -> sample [b, n, 64]."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance=None):
        return self.model(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]


def flux_export(pipe: LoadedPipeline, *, max_batch: int = 4, max_sequence_length: int = 512) -> FamilyExport:
    """Describe a Flux pipeline's components for export. `max_sequence_length`: T5 length (512 dev, 256 schnell)."""
    c = pipe.components
    transformer, vae = c["transformer"], c["vae"]
    tcfg = transformer.config
    clip_len = c["tokenizer"].model_max_length
    t5_len = max_sequence_length or 512
    batch = AxisRange(1, 1, max_batch)
    vae_scale = latent_spec(vae).vae_scale_factor
    default_latent = 2 * (128 // 2)  # diffusers' FluxPipeline: default_sample_size 128 latents a side
    latent_axis = AxisRange(2, default_latent, 2 * default_latent, multiple_of=2)
    tokens = AxisRange(1, (default_latent // 2) ** 2, default_latent**2)
    text_axis = AxisRange(1, t5_len, max(t5_len, 512))

    clip = c["text_encoder"]
    t5 = c["text_encoder_2"]
    inputs = [
        TensorTemplate("hidden_states", ("batch", "image_tokens", tcfg.in_channels)),
        TensorTemplate("encoder_hidden_states", ("batch", "text_tokens", tcfg.joint_attention_dim)),
        TensorTemplate("pooled_projections", ("batch", tcfg.pooled_projection_dim)),
        TensorTemplate("timestep", ("batch",), "float32", 0.0, 1.0),
        TensorTemplate("img_ids", ("image_tokens", 3), "float32", 0.0, 32.0),
        TensorTemplate("txt_ids", ("text_tokens", 3), "float32", 0.0, 0.0),
    ]
    if tcfg.guidance_embeds:
        inputs.append(TensorTemplate("guidance", ("batch",), "float32", 1.0, 8.0))
    components = [
        ComponentExport(
            name="text_encoder",
            module=CLIPPooledAdapter(clip),
            inputs=(TensorTemplate("input_ids", ("batch", "sequence"), "int64", 0, clip.config.vocab_size),),
            outputs=(TensorTemplate("pooler_output", ("batch", clip.config.hidden_size)),),
            axes={"batch": batch, "sequence": AxisRange(1, clip_len, clip_len)},
            trace_sizes={"batch": 2, "sequence": clip_len},
            validate_sizes=({"batch": 1, "sequence": clip_len}, {"batch": 2, "sequence": clip_len}),
            blocks=("encoder.layers",),
        ),
        ComponentExport(
            name="text_encoder_2",
            module=T5EncoderAdapter(t5),
            inputs=(TensorTemplate("input_ids", ("batch", "sequence"), "int64", 0, t5.config.vocab_size),),
            outputs=(TensorTemplate("last_hidden_state", ("batch", "sequence", t5.config.d_model)),),
            axes={"batch": batch, "sequence": text_axis},
            trace_sizes={"batch": 2, "sequence": 16},
            validate_sizes=({"batch": 1, "sequence": t5_len}, {"batch": 2, "sequence": 24}),
            blocks=("encoder.block",),
        ),
        ComponentExport(
            name="transformer",
            module=FluxTransformerAdapter(transformer),
            inputs=tuple(inputs),
            outputs=(TensorTemplate("sample", ("batch", "image_tokens", tcfg.out_channels or tcfg.in_channels)),),
            axes={"batch": batch, "image_tokens": tokens, "text_tokens": text_axis},
            trace_sizes={"batch": 2, "image_tokens": 16, "text_tokens": 8},
            validate_sizes=({"batch": 1, "image_tokens": 64, "text_tokens": t5_len}, {"batch": 2, "image_tokens": 24, "text_tokens": 5}),
            exporter="dynamo",  # the TorchScript tracer folds the rotary embedding's reshapes into constants
            blocks=("transformer_blocks", "single_transformer_blocks"),
        ),
        vae_decoder_export(vae, max_batch=max_batch, latent_axis=latent_axis, validate_latent=16),
    ]
    scheduler = c["scheduler"]
    return FamilyExport(
        family="flux",
        components=components,
        tokenizers={"tokenizer": (c["tokenizer"], clip_len), "tokenizer_2": (c["tokenizer_2"], t5_len)},
        latent=latent_spec(vae),
        scheduler=scheduler_entry(scheduler),
        defaults=Defaults(
            height=default_latent * vae_scale,
            width=default_latent * vae_scale,
            num_inference_steps=28,
            guidance_scale=3.5,
            max_sequence_length=t5_len,
        ),
        conditioning={
            "clip_encoder": ["text_encoder", "tokenizer"],
            "t5_encoder": ["text_encoder_2", "tokenizer_2"],
            "guidance_embeds": bool(tcfg.guidance_embeds),
        },
    )


def build_tiny(directory: Path, seed: int) -> None:
    """tiny-flux: the real Flux classes (CLIPTextModel, T5EncoderModel, FluxTransformer2DModel with guidance
    embedding, 16-channel AutoencoderKL), small configs; a 2x VAE keeps the default image at 256 px."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import PreTrainedTokenizerFast

    clip_tok, clip_cfg = clip_bpe(max_length=77)
    t5_tok, t5_cfg = t5_unigram()
    save_tokenizer(clip_tok, clip_cfg, directory / "tokenizer")
    save_tokenizer(t5_tok, t5_cfg, directory / "tokenizer_2")
    torch.manual_seed(seed)
    text_encoder = tiny_clip(clip_tok, hidden=32, layers=2)
    text_encoder_2 = tiny_t5(t5_tok, d_model=48, d_kv=12)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=48,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    vae = tiny_vae(channels=(8, 16), latent_channels=16, sample_size=256, scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=PreTrainedTokenizerFast.from_pretrained(directory / "tokenizer"),
        text_encoder_2=text_encoder_2,
        tokenizer_2=PreTrainedTokenizerFast.from_pretrained(directory / "tokenizer_2"),
        transformer=transformer,
    ).save_pretrained(directory, safe_serialization=True)

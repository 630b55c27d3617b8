"""Stable Diffusion 3 / 3.5: CLIP-L + CLIP-G (+ optional T5) text encoders, MMDiT denoiser, 16-channel VAE.

Export adapters fix each component's input/output names and return plain tensors; `sd3_export`
describes the pipeline for the manifest. Prompt handling at run time is in runtime/families/__init__.py.
"""

from __future__ import annotations

import torch

from dataclasses import dataclass
from pathlib import Path

from latentrt.models.loader import LoadedPipeline
from latentrt.models.spec import ComponentExport, FamilyExport, TensorTemplate, scheduler_entry
from latentrt.models.vae import latent_spec, vae_decoder_export
from latentrt.models.tiny import tiny_clip, tiny_t5, tiny_vae
from latentrt.models.tokenizers import clip_bpe, save_tokenizer, t5_unigram
from latentrt.bundle.manifest import AxisRange, Defaults

REQUIRED = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
OPTIONAL = ("text_encoder_3", "tokenizer_3")


class CLIPTextAdapter(torch.nn.Module):
    """input_ids [batch, sequence] int64 -> last_hidden_state, penultimate_hidden_state [batch, sequence, hidden],
    text_embeds [batch, projection] (the pooled, projected output)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        out = self.model(input_ids, output_hidden_states=True)
        return out.last_hidden_state, out.hidden_states[-2], out.text_embeds


class T5EncoderAdapter(torch.nn.Module):
    """input_ids [batch, sequence] int64 -> last_hidden_state [batch, sequence, d_model]."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        return self.model(input_ids)[0]


class SD3TransformerAdapter(torch.nn.Module):
    """hidden_states [b, c, h, w], encoder_hidden_states [b, seq, joint_dim], pooled_projections [b, pooled_dim],
    timestep [b] (sigma * 1000) -> sample [b, c, h, w] (the flow-matching velocity)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.model(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            return_dict=False,
        )[0]


def _clip_export(name: str, model, max_length: int, batch: AxisRange) -> ComponentExport:
    return ComponentExport(
        name=name,
        module=CLIPTextAdapter(model),
        inputs=(TensorTemplate("input_ids", ("batch", "sequence"), "int64", 0, model.config.vocab_size),),
        outputs=(
            TensorTemplate("last_hidden_state", ("batch", "sequence", model.config.hidden_size)),
            TensorTemplate("penultimate_hidden_state", ("batch", "sequence", model.config.hidden_size)),
            TensorTemplate("text_embeds", ("batch", model.config.projection_dim)),
        ),
        axes={"batch": batch, "sequence": AxisRange(1, max_length, max_length)},
        trace_sizes={"batch": 2, "sequence": max_length},
        validate_sizes=({"batch": 1, "sequence": max_length}, {"batch": 2, "sequence": max_length}),
        blocks=("encoder.layers",),
    )


def sd3_export(pipe: LoadedPipeline, *, max_batch: int = 4, max_sequence_length: int = 256) -> FamilyExport:
    """Describe an SD3 pipeline's components for export.

    Args:
        max_batch: the most images per call; with classifier-free guidance the text encoders and the
            denoiser see up to `2 * max_batch`.
        max_sequence_length: the T5 token length prompts are padded to (diffusers' default 256).
    """
    c = pipe.components
    transformer, vae = c["transformer"], c["vae"]
    tcfg = transformer.config
    clip_len = c["tokenizer"].model_max_length
    clip_width = c["text_encoder"].config.hidden_size + c["text_encoder_2"].config.hidden_size
    batch = AxisRange(1, 2, 2 * max_batch)

    components = [
        _clip_export("text_encoder", c["text_encoder"], clip_len, batch),
        _clip_export("text_encoder_2", c["text_encoder_2"], clip_len, batch),
    ]
    tokenizers = {"tokenizer": (c["tokenizer"], clip_len), "tokenizer_2": (c["tokenizer_2"], clip_len)}
    t5_max = max(max_sequence_length, 512)
    if c["text_encoder_3"] is not None:
        components.append(
            ComponentExport(
                name="text_encoder_3",
                module=T5EncoderAdapter(c["text_encoder_3"]),
                inputs=(TensorTemplate("input_ids", ("batch", "sequence"), "int64", 0, c["text_encoder_3"].config.vocab_size),),
                outputs=(TensorTemplate("last_hidden_state", ("batch", "sequence", c["text_encoder_3"].config.d_model)),),
                axes={"batch": batch, "sequence": AxisRange(1, max_sequence_length, t5_max)},
                trace_sizes={"batch": 2, "sequence": 16},
                validate_sizes=({"batch": 1, "sequence": max_sequence_length}, {"batch": 2, "sequence": 24}),
                blocks=("encoder.block",),
            )
        )
        tokenizers["tokenizer_3"] = (c["tokenizer_3"], max_sequence_length)

    vae_scale = latent_spec(vae).vae_scale_factor
    patch = tcfg.patch_size
    sample = tcfg.sample_size
    # The cropped positional embedding limits the latent to pos_embed_max_size patches a side.
    max_latent = tcfg.pos_embed_max_size * patch if tcfg.pos_embed_max_size else 4 * sample
    latent_axis = AxisRange(2 * patch, sample, max_latent, multiple_of=patch)
    small, odd = 2 * patch, 3 * patch  # a non-square latent different from the traced one
    components.append(
        ComponentExport(
            name="transformer",
            module=SD3TransformerAdapter(transformer),
            inputs=(
                TensorTemplate("hidden_states", ("batch", tcfg.in_channels, "latent_height", "latent_width")),
                TensorTemplate("encoder_hidden_states", ("batch", "context_length", tcfg.joint_attention_dim)),
                TensorTemplate("pooled_projections", ("batch", tcfg.pooled_projection_dim)),
                TensorTemplate("timestep", ("batch",), "float32", 0.0, 1000.0),
            ),
            outputs=(TensorTemplate("sample", ("batch", tcfg.out_channels, "latent_height", "latent_width")),),
            axes={
                "batch": batch,
                "latent_height": latent_axis,
                "latent_width": latent_axis,
                "context_length": AxisRange(clip_len, clip_len + max_sequence_length, clip_len + t5_max),
            },
            trace_sizes={"batch": 2, "latent_height": 2 * small, "latent_width": 2 * small, "context_length": clip_len + 8},
            validate_sizes=(
                {"batch": 1, "latent_height": sample, "latent_width": sample, "context_length": clip_len + max_sequence_length},
                {"batch": 2, "latent_height": odd, "latent_width": 2 * odd, "context_length": clip_len + 5},
            ),
            blocks=("transformer_blocks",),
        )
    )
    components.append(
        vae_decoder_export(vae, max_batch=max_batch, latent_axis=latent_axis, validate_latent=sample)
    )

    scheduler = c["scheduler"]
    return FamilyExport(
        family="sd3",
        components=components,
        tokenizers=tokenizers,
        latent=latent_spec(vae),
        scheduler=scheduler_entry(scheduler),
        defaults=Defaults(
            height=sample * vae_scale,
            width=sample * vae_scale,
            num_inference_steps=28,
            guidance_scale=7.0,
            max_sequence_length=max_sequence_length,
        ),
        conditioning={
            "clip_encoders": [["text_encoder", "tokenizer"], ["text_encoder_2", "tokenizer_2"]],
            "t5_encoder": ["text_encoder_3", "tokenizer_3"] if c["text_encoder_3"] is not None else None,
            "joint_attention_dim": tcfg.joint_attention_dim,
            "patch_size": patch,
            "clip_width": clip_width,
        },
    )


@dataclass(frozen=True)
class SD3Sizes:
    """The knobs of a small SD3-architecture pipeline (the real classes, fewer and narrower layers)."""

    clip_widths: tuple[int, int] = (32, 48)
    clip_layers: int = 3
    t5_width: int = 96
    t5_layers: int = 2
    dit_layers: int = 2
    dit_heads: int = 4
    dit_head_dim: int = 16
    sample_size: int = 16  # latent pixels a side by default
    vae_channels: tuple[int, ...] = (8, 16, 16, 16)


TINY = SD3Sizes()
# benchmarks/: an 18.6M-parameter MMDiT at 256x256 (32x32 latents, 256 image tokens), so the denoiser dominates.
BENCH = SD3Sizes(clip_widths=(64, 96), clip_layers=4, t5_width=256, t5_layers=4, dit_layers=8, dit_heads=8, dit_head_dim=32, sample_size=32, vae_channels=(16, 32, 32, 32))


def build_tiny(directory: Path, seed: int) -> None:
    """tiny-sd3: the real SD3 classes (2 CLIPs with projection, T5, MMDiT, 16-channel VAE), small configs."""
    build(directory, seed, TINY)


def build_bench(directory: Path, seed: int) -> None:
    """bench-sd3: the fixed benchmark pipeline of benchmarks/ (several million parameters, 256x256)."""
    build(directory, seed, BENCH)


def build(directory: Path, seed: int, sizes: SD3Sizes) -> None:
    """Write an SD3-architecture pipeline with random weights from `seed` to `directory`."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import PreTrainedTokenizerFast

    clip_tok, clip_cfg = clip_bpe(max_length=77)
    t5_tok, t5_cfg = t5_unigram()
    for sub, (tok, cfg) in {"tokenizer": (clip_tok, clip_cfg), "tokenizer_2": (clip_tok, clip_cfg), "tokenizer_3": (t5_tok, t5_cfg)}.items():
        save_tokenizer(tok, cfg, directory / sub)

    torch.manual_seed(seed)
    text_encoder = tiny_clip(clip_tok, hidden=sizes.clip_widths[0], projection=sizes.clip_widths[0], layers=sizes.clip_layers)
    text_encoder_2 = tiny_clip(clip_tok, hidden=sizes.clip_widths[1], projection=sizes.clip_widths[1], layers=sizes.clip_layers)
    text_encoder_3 = tiny_t5(t5_tok, d_model=sizes.t5_width, layers=sizes.t5_layers)
    transformer = SD3Transformer2DModel(
        sample_size=sizes.sample_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=sizes.dit_layers,
        attention_head_dim=sizes.dit_head_dim,
        num_attention_heads=sizes.dit_heads,
        joint_attention_dim=sizes.t5_width,
        caption_projection_dim=sizes.dit_heads * sizes.dit_head_dim,
        pooled_projection_dim=sum(sizes.clip_widths),
        pos_embed_max_size=3 * sizes.sample_size,
    )
    vae = tiny_vae(
        channels=sizes.vae_channels,
        latent_channels=16,
        sample_size=sizes.sample_size * 2 ** (len(sizes.vae_channels) - 1),
        scaling_factor=1.5305,
        shift_factor=0.0609,
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

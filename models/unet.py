"""Stable Diffusion 1.x/2.x and SDXL: CLIP text encoder(s), U-Net denoiser, 4-channel VAE.

Export adapters fix each component's input/output names and return plain tensors;
`sd15_export` / `sdxl_export` describe the pipelines for the manifest. Prompt handling at run time
is in runtime/families/unet.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentrt.errors import InputError
from latentrt.models.loader import LoadedPipeline, read_model_index
from latentrt.models.sd3 import CLIPTextAdapter
from latentrt.models.spec import ComponentExport, FamilyExport, TensorTemplate, scheduler_entry
from latentrt.models.vae import latent_spec, vae_decoder_export
from latentrt.models.tiny import tiny_clip, tiny_vae
from latentrt.models.tokenizers import clip_bpe, save_tokenizer
from latentrt.bundle.manifest import AxisRange, Defaults

SD15_REQUIRED = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
SDXL_REQUIRED = ("unet", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
OPTIONAL: tuple[str, ...] = ()


class CLIPTextHiddenAdapter(torch.nn.Module):
    """input_ids [batch, sequence] int64 -> last_hidden_state, penultimate_hidden_state [batch, sequence, hidden]
    (a CLIPTextModel without projection: SD 1.x's encoder, SDXL's first)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        out = self.model(input_ids, output_hidden_states=True)
        return out.last_hidden_state, out.hidden_states[-2]


class UNetAdapter(torch.nn.Module):
    """sample [b, 4, h, w], timestep [b] float32, encoder_hidden_states [b, 77, cross_dim] -> out_sample [b, 4, h, w]
    (the predicted noise, or v with v_prediction)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class UNetXLAdapter(torch.nn.Module):
    """SDXL's U-Net: as `UNetAdapter`, plus text_embeds [b, pooled_dim] (pooled text projection) and
    time_ids [b, 6] float32 (original size, crop top-left, target size)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return self.model(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            return_dict=False,
        )[0]


def _text_encoder_export(name: str, model, max_length: int, batch: AxisRange) -> ComponentExport:
    """A CLIP text encoder, with or without projection (the latter adds a pooled `text_embeds` output)."""
    cfg = model.config
    outputs = [
        TensorTemplate("last_hidden_state", ("batch", "sequence", cfg.hidden_size)),
        TensorTemplate("penultimate_hidden_state", ("batch", "sequence", cfg.hidden_size)),
    ]
    if hasattr(model, "text_projection"):
        adapter = CLIPTextAdapter(model)
        outputs.append(TensorTemplate("text_embeds", ("batch", cfg.projection_dim)))
    else:
        adapter = CLIPTextHiddenAdapter(model)
    return ComponentExport(
        name=name,
        module=adapter,
        inputs=(TensorTemplate("input_ids", ("batch", "sequence"), "int64", 0, cfg.vocab_size),),
        outputs=tuple(outputs),
        axes={"batch": batch, "sequence": AxisRange(1, max_length, max_length)},
        trace_sizes={"batch": 2, "sequence": max_length},
        validate_sizes=({"batch": 1, "sequence": max_length}, {"batch": 2, "sequence": max_length}),
        blocks=("encoder.layers",),
    )


def _unet_family(pipe: LoadedPipeline, family: str, max_batch: int, defaults: dict) -> FamilyExport:
    c = pipe.components
    unet, vae = c["unet"], c["vae"]
    ucfg, vcfg = unet.config, vae.config
    if getattr(vcfg, "latents_mean", None) is not None or getattr(vcfg, "latents_std", None) is not None:
        raise InputError(
            f"{pipe.path}/vae/config.json sets latents_mean/latents_std, which latentrt's VAE decoding does not apply yet; "
            "use a VAE without latent normalization"
        )
    if ucfg.time_cond_proj_dim is not None:
        raise InputError(
            f"{pipe.path}/unet/config.json sets time_cond_proj_dim (a guidance-distilled LCM U-Net), which latentrt "
            "does not export yet; use a U-Net without guidance embedding"
        )
    if not isinstance(ucfg.sample_size, int):
        raise InputError(f"{pipe.path}/unet/config.json: sample_size {ucfg.sample_size!r} must be one int (square default)")
    encoders = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    clip_len = c["tokenizer"].model_max_length
    cross_dim = sum(c[e].config.hidden_size for e in encoders)
    if cross_dim != ucfg.cross_attention_dim:
        raise InputError(
            f"{pipe.path}: the text encoders' hidden sizes add up to {cross_dim}, but the U-Net's cross_attention_dim "
            f"is {ucfg.cross_attention_dim}; the checkpoint's components do not belong together"
        )
    batch = AxisRange(1, 2, 2 * max_batch)
    components = [_text_encoder_export(e, c[e], clip_len, batch) for e in encoders]
    tokenizers = {t: (c[t], clip_len) for t in ["tokenizer", "tokenizer_2"][: len(encoders)]}

    vae_scale = latent_spec(vae).vae_scale_factor
    # Each of the U-Net's down blocks but the last halves the latent: sizes must divide evenly.
    multiple = 2 ** (len(ucfg.block_out_channels) - 1)
    sample = ucfg.sample_size
    latent_axis = AxisRange(multiple, sample, 4 * sample, multiple_of=multiple)
    small, odd = 2 * multiple, 3 * multiple  # a non-square latent different from the traced one
    latent = ("batch", ucfg.in_channels, "latent_height", "latent_width")
    inputs = [
        TensorTemplate("sample", latent),
        TensorTemplate("timestep", ("batch",), "float32", 0.0, 1000.0),
        TensorTemplate("encoder_hidden_states", ("batch", clip_len, ucfg.cross_attention_dim)),
    ]
    conditioning = {
        "text_encoders": [[e, t] for e, t in zip(encoders, tokenizers)],
        "hidden_state": "last_hidden_state" if family == "sd15" else "penultimate_hidden_state",
    }
    if family == "sdxl":
        pooled_dim = c["text_encoder_2"].config.projection_dim
        expected = ucfg.addition_time_embed_dim * 6 + pooled_dim
        if unet.add_embedding.linear_1.in_features != expected:
            raise InputError(
                f"{pipe.path}: the U-Net's added embedding takes {unet.add_embedding.linear_1.in_features} features, "
                f"but 6 time ids x {ucfg.addition_time_embed_dim} + text_encoder_2's projection {pooled_dim} = {expected}"
            )
        inputs += [
            TensorTemplate("text_embeds", ("batch", pooled_dim)),
            TensorTemplate("time_ids", ("batch", 6), "float32", 0.0, 1024.0),
        ]
        conditioning.update(
            pooled=["text_encoder_2", "text_embeds"],
            # diffusers' SDXL: with no negative prompt the unconditional embeddings are zeros.
            force_zeros_for_empty_prompt=bool(read_model_index(pipe.path).get("force_zeros_for_empty_prompt", True)),
        )
    unet_export = ComponentExport(
        name="unet",
        module=(UNetXLAdapter if family == "sdxl" else UNetAdapter)(unet),
        inputs=tuple(inputs),
        # ONNX names must be unique across inputs and outputs: Optimum's name for the U-Net output.
        outputs=(TensorTemplate("out_sample", ("batch", ucfg.out_channels, "latent_height", "latent_width")),),
        axes={"batch": batch, "latent_height": latent_axis, "latent_width": latent_axis},
        trace_sizes={"batch": 2, "latent_height": 2 * small, "latent_width": 2 * small},
        validate_sizes=(
            {"batch": 1, "latent_height": sample, "latent_width": sample},
            {"batch": 2, "latent_height": odd, "latent_width": 2 * odd},
        ),
    )
    vae_export = vae_decoder_export(vae, max_batch=max_batch, latent_axis=latent_axis, validate_latent=sample)
    return FamilyExport(
        family=family,
        components=[*components, unet_export, vae_export],
        tokenizers=tokenizers,
        latent=latent_spec(vae),
        scheduler=_scheduler_entry(c["scheduler"], family),
        defaults=Defaults(height=sample * vae_scale, width=sample * vae_scale, max_sequence_length=clip_len, **defaults),
        conditioning=conditioning,
    )


def _scheduler_entry(scheduler, family: str) -> dict:
    """The manifest's scheduler entry, with the corrections StableDiffusionPipeline.__init__ applies
    to outdated configs (steps_offset=1, clip_sample=False) so that sampling matches diffusers."""
    fixes = {"steps_offset": 1, "clip_sample": False} if family == "sd15" else {}
    return scheduler_entry(scheduler, **{k: v for k, v in fixes.items() if k in scheduler.config})


def sd15_export(pipe: LoadedPipeline, *, max_batch: int = 4, max_sequence_length: int = 77) -> FamilyExport:
    """Describe a StableDiffusionPipeline (SD 1.x/2.x) for export.

    Args:
        max_batch: the most images per call; with classifier-free guidance the text encoder and the
            U-Net see up to `2 * max_batch`.
        max_sequence_length: unused (prompts are always padded to the CLIP tokenizer's length).
    """
    return _unet_family(pipe, "sd15", max_batch, dict(num_inference_steps=50, guidance_scale=7.5))


def sdxl_export(pipe: LoadedPipeline, *, max_batch: int = 4, max_sequence_length: int = 77) -> FamilyExport:
    """Describe a StableDiffusionXLPipeline for export (arguments as `sd15_export`)."""
    return _unet_family(pipe, "sdxl", max_batch, dict(num_inference_steps=50, guidance_scale=5.0))


def build_tiny_sd15(directory: Path, seed: int) -> None:
    """tiny-sd15: the real SD 1.5 classes (CLIPTextModel, U-Net with cross-attention, 4-channel VAE,
    DDIM with SD 1.5's epsilon-prediction schedule), small configs; 64x64 images by default."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import PreTrainedTokenizerFast

    tok, tok_cfg = clip_bpe(max_length=77)
    save_tokenizer(tok, tok_cfg, directory / "tokenizer")
    torch.manual_seed(seed)
    text_encoder = tiny_clip(tok, hidden=32)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(channels=(8, 16, 16, 16), latent_channels=4, sample_size=64, scaling_factor=0.18215),
        text_encoder=text_encoder,
        tokenizer=PreTrainedTokenizerFast.from_pretrained(directory / "tokenizer"),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)


def build_tiny_sdxl(directory: Path, seed: int) -> None:
    """tiny-sdxl: the real SDXL classes (CLIPTextModel + CLIPTextModelWithProjection, U-Net with
    text_time added conditioning, 4-channel VAE, SDXL's EulerDiscrete schedule), small configs;
    64x64 images by default."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import PreTrainedTokenizerFast

    tok, tok_cfg = clip_bpe(max_length=77)
    for sub in ("tokenizer", "tokenizer_2"):
        save_tokenizer(tok, tok_cfg, directory / sub)
    torch.manual_seed(seed)
    text_encoder = tiny_clip(tok, hidden=32)
    text_encoder_2 = tiny_clip(tok, hidden=32, projection=32)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(channels=(8, 16, 16, 16), latent_channels=4, sample_size=64, scaling_factor=0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=PreTrainedTokenizerFast.from_pretrained(directory / "tokenizer"),
        tokenizer_2=PreTrainedTokenizerFast.from_pretrained(directory / "tokenizer_2"),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)

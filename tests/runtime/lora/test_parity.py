"""LoRA on every family's tiny preset against diffusers itself: diffusers' `load_lora_weights` +
`set_adapters` (PixArt, whose pipeline has no LoRA loader: the models' own PEFT adapters) vs
latentrt's, same latents, within the family parity tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentrt.runtime.pipeline import Pipeline

TOLERANCE = 2e-3

# family preset -> (diffusers pipeline class, denoiser modules, (text encoder, its modules), latents(n, h, w), call kwargs)
CASES = {
    "tiny-sd3": (
        "StableDiffusion3Pipeline",
        ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.add_v_proj",
         "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.norm1.linear", "transformer_blocks.1.ff.net.0.proj"],
        ("text_encoder", ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"]),
        lambda n, h, w: (n, 16, h // 8, w // 8),
        dict(guidance_scale=4.0, height=64, width=64),
    ),
    "tiny-flux": (
        "FluxPipeline",
        ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.norm1.linear", "single_transformer_blocks.0.attn.to_k",
         "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.norm.linear", "single_transformer_blocks.0.proj_out"],
        ("text_encoder", ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.v_proj"]),
        lambda n, h, w: (n, (h // 4) * (w // 4), 64),
        dict(guidance_scale=3.5, height=64, width=64, max_sequence_length=32),
    ),
    "tiny-sd15": (
        "StableDiffusionPipeline",
        ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
         "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj", "down_blocks.0.attentions.0.proj_in", "down_blocks.0.resnets.0.conv1"],
        ("text_encoder", ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"]),
        lambda n, h, w: (n, 4, h // 8, w // 8),
        dict(guidance_scale=7.5, height=64, width=64),
    ),
    "tiny-sdxl": (
        "StableDiffusionXLPipeline",
        ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
         "mid_block.attentions.0.proj_out", "up_blocks.0.resnets.0.conv2"],
        ("text_encoder_2", ["text_model.encoder.layers.0.self_attn.k_proj", "text_model.encoder.layers.0.mlp.fc2"]),
        lambda n, h, w: (n, 4, h // 8, w // 8),
        dict(guidance_scale=5.0, height=64, width=64),
    ),
    "tiny-pixart": (
        "PixArtAlphaPipeline",
        ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn2.to_k", "transformer_blocks.1.ff.net.0.proj"],
        ("text_encoder", ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.1.layer.1.DenseReluDense.wi_0"]),
        lambda n, h, w: (n, 4, h // 8, w // 8),
        dict(guidance_scale=4.0, height=64, width=64),
    ),
}


@pytest.fixture(scope="module")
def cases(preset_source, preset_bundle):
    """`cases(preset)`: (diffusers pipeline, latentrt pipeline) for a preset (each built once)."""
    import diffusers

    made = {}

    def get(preset):
        if preset not in made:
            extra = {"add_watermarker": False} if preset == "tiny-sdxl" else {}
            reference = getattr(diffusers, CASES[preset][0]).from_pretrained(preset_source(preset), use_safetensors=True, **extra)
            reference.set_progress_bar_config(disable=True)
            made[preset] = (reference, Pipeline.load(preset_bundle(preset)))
        return made[preset]

    return get


def _adapter_files(reference, preset, kit, seed):
    """Two adapters of `preset`: each on the denoiser and a text encoder (the second with alpha in
    the diffusers metadata header)."""
    _, modules, (encoder, encoder_modules), _, _ = CASES[preset]
    denoiser = "unet" if hasattr(reference, "unet") else "transformer"
    files = []
    for k, alpha in enumerate((None, 2.0)):
        pairs = kit.random_pairs(getattr(reference, denoiser), modules, seed=seed + k)
        text = kit.random_pairs(getattr(reference, encoder), encoder_modules, seed=seed + 10 + k, scale=0.2)
        tensors = kit.peft_keys(denoiser, pairs) | kit.peft_keys(encoder, text)
        metadata = None
        if alpha is not None:
            metadata = kit.peft_metadata([denoiser, encoder], rank=4, alpha=alpha, targets={denoiser: modules, encoder: encoder_modules})
        files.append((kit.write(f"{preset}-{k}", tensors, metadata), tensors, metadata))
    return denoiser, encoder, files


def _load_reference(reference, preset, denoiser, encoder, path, tensors, metadata, name):
    """diffusers' LoRA loading: the pipeline's loader, or (PixArt, whose pipeline and transformer have
    none) PEFT's own injection into each model."""
    if hasattr(reference, "load_lora_weights"):
        reference.load_lora_weights(str(path), adapter_name=name)
        return
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    alpha = 2.0 if metadata else 4
    for prefix, modules in ((denoiser, CASES[preset][1]), (encoder, CASES[preset][2][1])):
        model = getattr(reference, prefix)
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=alpha, target_modules=modules), model, adapter_name=name)
        state = {k[len(prefix) + 1 :]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith(f"{prefix}.")}
        result = set_peft_model_state_dict(model, state, adapter_name=name)
        assert not result.unexpected_keys


def _set_reference(reference, denoiser, encoder, names, weights):
    if hasattr(reference, "set_adapters"):
        reference.set_adapters(names, adapter_weights=weights)
        return
    from peft.tuners.lora import LoraLayer

    for model in (getattr(reference, denoiser), getattr(reference, encoder)):  # PEFT's own mixing: active adapters, scales
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.set_adapter(names)
                for name, weight in zip(names, weights):
                    module.set_scale(name, weight)


@pytest.mark.parametrize("preset", list(CASES))
def test_adapters_and_mix_match_diffusers(cases, kit, preset):
    reference, ours = cases(preset)
    latents_shape, kwargs = CASES[preset][3], CASES[preset][4]
    latents = np.random.default_rng(3).standard_normal(latents_shape(1, kwargs["height"], kwargs["width"]), dtype=np.float32)
    call = dict(prompt=["a red cat on the left"], num_inference_steps=3, **kwargs)

    extra = dict(use_resolution_binning=False, clean_caption=False, max_sequence_length=120) if preset == "tiny-pixart" else {}

    def theirs():
        return reference(**call, **extra, latents=torch.from_numpy(latents), output_type="np").images

    base = theirs()
    denoiser, encoder, files = _adapter_files(reference, preset, kit, seed=11)
    try:
        for k, (path, tensors, metadata) in enumerate(files):
            _load_reference(reference, preset, denoiser, encoder, path, tensors, metadata, f"a{k}")
        _set_reference(reference, denoiser, encoder, ["a0"], [1.0])
        one = theirs()
        _set_reference(reference, denoiser, encoder, ["a0", "a1"], [0.8, 0.5])
        mixed = theirs()

        for k, (path, _, _) in enumerate(files):
            ours.load_lora_weights(path, adapter_name=f"a{k}")
        ours.set_adapters(["a0"])
        assert np.abs(ours(**call, latents=latents).pixels - one).max() <= TOLERANCE
        assert np.abs(one - base).max() > 20 * TOLERANCE  # the adapter changes the image
        ours.set_adapters(["a0", "a1"], adapter_weights=[0.8, 0.5])
        assert ours.get_active_adapters() == ["a0", "a1"]
        assert np.abs(ours(**call, latents=latents).pixels - mixed).max() <= TOLERANCE
        ours.set_adapters([])
        assert np.abs(ours(**call, latents=latents).pixels - base).max() <= TOLERANCE
    finally:
        ours.unload_lora_weights()

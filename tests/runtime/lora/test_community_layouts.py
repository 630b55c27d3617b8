"""Community LoRA layouts (kohya for SD 1.5 / SDXL, kohya and BFL/ComfyUI for Flux), written from
random tensors under their own key names, loaded by diffusers' converters and by latentrt: the
images must agree (diffusers is the oracle, not a copy of latentrt's mapping)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentrt.runtime.lora.formats import parse_lora
from latentrt.runtime.lora.weights import ComponentWeights, lora_delta
from latentrt.runtime.pipeline import Pipeline

TOLERANCE = 2e-3


def _kohya(model_modules, model, *, rank=4, seed=0, alpha=None, prefix_dots=False):
    """kohya keys: {community name: diffusers module of `model` whose shape it takes}."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, module in model_modules.items():
        shape = _shape(model, module)
        down = rng.standard_normal((rank, *shape[1:]), dtype=np.float32) * 0.3
        up = rng.standard_normal((shape[0], rank, *([1, 1] if len(shape) == 4 else [])), dtype=np.float32) * 0.3
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            out[f"{name}.alpha"] = np.array(alpha, np.float32)
    return out


@pytest.fixture(scope="module")
def pair(preset_source, preset_bundle):
    import diffusers

    made = {}

    def get(preset, cls):
        if preset not in made:
            extra = {"add_watermarker": False} if preset == "tiny-sdxl" else {}
            reference = getattr(diffusers, cls).from_pretrained(preset_source(preset), use_safetensors=True, **extra)
            reference.set_progress_bar_config(disable=True)
            made[preset] = (reference, Pipeline.load(preset_bundle(preset)))
        return made[preset]

    return get


def _compare(reference, ours, path, latents, call, extra=None):
    expected = reference(**call, latents=torch.from_numpy(latents), output_type="np").images
    reference.unload_lora_weights()
    base = reference(**call, latents=torch.from_numpy(latents), output_type="np").images
    try:
        ours.load_lora_weights(path, adapter_name="community")
        got = ours(**call, latents=latents).pixels
    finally:
        ours.unload_lora_weights()
    assert np.abs(expected - base).max() > 20 * TOLERANCE  # the LoRA changes the image
    assert np.abs(got - expected).max() <= TOLERANCE


def test_kohya_sd15(pair, kit):
    reference, ours = pair("tiny-sd15", "StableDiffusionPipeline")
    unet = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v": "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
        "lora_unet_up_blocks_1_attentions_0_proj_out": "up_blocks.1.attentions.0.proj_out",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    }
    text = {"lora_te_text_model_encoder_layers_0_self_attn_out_proj": "encoder.layers.0.self_attn.out_proj",
            "lora_te_text_model_encoder_layers_1_mlp_fc2": "encoder.layers.1.mlp.fc2"}
    tensors = _kohya(unet, reference.unet, alpha=2.0) | _kohya(text, reference.text_encoder, seed=1, alpha=8.0)
    path = kit.write("kohya-sd15", tensors)
    reference.load_lora_weights(str(path))
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8), dtype=np.float32)
    _compare(reference, ours, path, latents, dict(prompt=["a red cat"], num_inference_steps=3, guidance_scale=7.5, height=64, width=64))


def test_kohya_sdxl_original_unet_names(pair, kit):
    """kohya trains SDXL on the original (SGM) U-Net: input_blocks / middle_block / output_blocks."""
    reference, ours = pair("tiny-sdxl", "StableDiffusionXLPipeline")
    unet = {
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k": "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
        "lora_unet_input_blocks_3_1_proj_in": "down_blocks.1.attentions.0.proj_in",
        "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj": "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "lora_unet_output_blocks_1_1_transformer_blocks_1_attn1_to_out_0": "up_blocks.0.attentions.1.transformer_blocks.1.attn1.to_out.0",
    }
    # (diffusers' converter infers a text encoder's layout from an out_proj key: each has one; with MLP keys
    # beside attention ones it drops the attention ones)
    te1 = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "encoder.layers.0.self_attn.q_proj",
           "lora_te1_text_model_encoder_layers_0_self_attn_out_proj": "encoder.layers.0.self_attn.out_proj"}
    te2 = {"lora_te2_text_model_encoder_layers_1_self_attn_v_proj": "text_model.encoder.layers.1.self_attn.v_proj",
           "lora_te2_text_model_encoder_layers_1_self_attn_out_proj": "text_model.encoder.layers.1.self_attn.out_proj"}
    tensors = (_kohya(unet, reference.unet, alpha=1.0) | _kohya(te1, reference.text_encoder, seed=1)
               | _kohya(te2, reference.text_encoder_2, seed=2, alpha=2.0))
    path = kit.write("kohya-sdxl", tensors)
    reference.load_lora_weights(str(path))
    latents = np.random.default_rng(2).standard_normal((1, 4, 8, 8), dtype=np.float32)
    _compare(reference, ours, path, latents, dict(prompt=["a red cat"], num_inference_steps=3, guidance_scale=5.0, height=64, width=64))


FLUX_KOHYA = {  # BFL module name -> a diffusers module of the same shape (qkv: three of them stacked)
    "double_blocks_0_img_attn_qkv": ("transformer_blocks.0.attn.to_q", 3),
    "double_blocks_0_txt_attn_proj": ("transformer_blocks.0.attn.to_add_out", 1),
    "double_blocks_0_img_mlp_0": ("transformer_blocks.0.ff.net.0.proj", 1),
    "double_blocks_0_txt_mod_lin": ("transformer_blocks.0.norm1_context.linear", 1),
    "single_blocks_0_linear2": ("single_transformer_blocks.0.proj_out", 1),
    "single_blocks_0_modulation_lin": ("single_transformer_blocks.0.norm.linear", 1),
}  # (final_layer: diffusers 0.42's converter drops it - its keys lose the `transformer.` prefix; tested below)


def _flux_tensors(reference, *, dotted: bool):
    rng = np.random.default_rng(4)
    out = {}
    for name, (module, stack) in FLUX_KOHYA.items():
        out_dim, in_dim = _shape(reference.transformer, module)
        key = f"diffusion_model.{_bfl_dotted(name)}" if dotted else f"lora_unet_{name}"
        out[f"{key}.lora_down.weight"] = rng.standard_normal((4, in_dim), dtype=np.float32) * 0.3
        out[f"{key}.lora_up.weight"] = rng.standard_normal((stack * out_dim, 4), dtype=np.float32) * 0.3
        out[f"{key}.alpha"] = np.array(2.0, np.float32)
    for name in ("self_attn_q_proj", "self_attn_out_proj"):
        clip = _shape(reference.text_encoder, f"encoder.layers.0.{name.replace('_attn_', '_attn.')}")
        out[f"lora_te1_text_model_encoder_layers_0_{name}.lora_down.weight"] = rng.standard_normal((4, clip[1]), dtype=np.float32) * 0.3
        out[f"lora_te1_text_model_encoder_layers_0_{name}.lora_up.weight"] = rng.standard_normal((clip[0], 4), dtype=np.float32) * 0.3
    return out


def _shape(model, module):
    """A module's weight shape, also once PEFT wrapped it (`base_layer`)."""
    params = dict(model.named_parameters())
    weight = params.get(f"{module}.weight", params.get(f"{module}.base_layer.weight"))
    return tuple(weight.shape)


def _bfl_dotted(name: str) -> str:
    """kohya's underscore name back to BFL's dotted one (as ComfyUI writes it)."""
    table = {"double_blocks_0_": "double_blocks.0.", "single_blocks_0_": "single_blocks.0."}
    for k, v in table.items():
        if name.startswith(k):
            rest = name[len(k):]
            return v + {"img_attn_qkv": "img_attn.qkv", "txt_attn_proj": "txt_attn.proj", "img_mlp_0": "img_mlp.0", "txt_mod_lin": "txt_mod.lin",
                        "linear2": "linear2", "modulation_lin": "modulation.lin"}[rest]
    raise KeyError(name)


@pytest.mark.parametrize("dotted", [False, True], ids=["kohya", "comfyui-bfl"])
def test_flux_bfl_layouts(pair, kit, dotted):
    reference, ours = pair("tiny-flux", "FluxPipeline")
    tensors = _flux_tensors(reference, dotted=dotted)
    if dotted:  # ComfyUI writes the text encoder under its own name
        tensors = {k: v for k, v in tensors.items() if not k.startswith("lora_te1_")}
    path = kit.write("flux-" + ("bfl" if dotted else "kohya"), tensors)
    reference.load_lora_weights(str(path))
    latents = np.random.default_rng(5).standard_normal((1, 16 * 16, 64), dtype=np.float32)
    _compare(reference, ours, path, latents, dict(prompt=["a red cat"], num_inference_steps=3, guidance_scale=3.5, height=64, width=64, max_sequence_length=32))


def test_flux_linear1_split_matches_diffusers_converter():
    """Flux's single-block `linear1` (q, k, v and the MLP's input in one matrix) is split by
    diffusers' converter at FLUX.1's sizes (3 x 3072 + 12288); latentrt splits it by the sizes the
    bundle records. At FLUX.1's sizes the two give the same per-module updates."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    rng = np.random.default_rng(0)
    inner, mlp, rank = 3072, 12288, 4
    down = rng.standard_normal((rank, inner), dtype=np.float32)
    up = rng.standard_normal((3 * inner + mlp, rank), dtype=np.float32)
    theirs = _convert_kohya_flux_lora_to_diffusers({
        "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.from_numpy(down),
        "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.from_numpy(up),
        "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(8.0),
    })
    block = "single_transformer_blocks.0"
    names = [f"{block}.proj_mlp.weight", f"{block}.attn.to_q.weight", f"{block}.attn.to_k.weight", f"{block}.attn.to_v.weight"]
    weights = ComponentWeights("transformer", {  # the export's fusion order: proj_mlp first, as in tiny-flux's bundle
        "fused": {"parts": [[n, "T"] for n in names], "shape": [inner, 3 * inner + mlp], "axis": 1, "sizes": [mlp, inner, inner, inner]},
    })
    layers = parse_lora({"lora_unet_single_blocks_0_linear1.lora_down.weight": down, "lora_unet_single_blocks_0_linear1.lora_up.weight": up,
                         "lora_unet_single_blocks_0_linear1.alpha": np.array(8.0, np.float32)},
                        {}, family="flux", denoiser="transformer", weights={"transformer": weights})
    ours = {layer.module: layer.scale * lora_delta(layer.down, layer.up) for layer in layers}
    assert sorted(ours) == sorted(n[: -len(".weight")] for n in names)
    for module, delta in ours.items():
        a = theirs[f"transformer.{module}.lora_A.weight"].numpy()
        b = theirs[f"transformer.{module}.lora_B.weight"].numpy()
        np.testing.assert_allclose(delta, b @ a, rtol=1e-5, atol=1e-4)


def test_flux_final_layer_swaps_shift_and_scale():
    """BFL's final adaLN linear writes [shift, scale], diffusers' norm_out.linear [scale, shift]:
    its update's rows are swapped with diffusers' own `swap_scale_shift`."""
    from diffusers.loaders.lora_conversion_utils import swap_scale_shift

    rng = np.random.default_rng(1)
    down, up = rng.standard_normal((4, 8), dtype=np.float32), rng.standard_normal((12, 4), dtype=np.float32)
    weights = ComponentWeights("transformer", {"norm_out.linear.weight": {"parts": [["norm_out.linear.weight", ""]], "shape": [12, 8], "axis": 0}})
    (layer,) = parse_lora({"lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": down, "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": up},
                          {}, family="flux", denoiser="transformer", weights={"transformer": weights})
    assert layer.module == "norm_out.linear"
    np.testing.assert_allclose(lora_delta(layer.down, layer.up), swap_scale_shift(torch.from_numpy(up)).numpy() @ down, rtol=1e-6)

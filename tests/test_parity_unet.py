"""latentrt on ONNX Runtime against diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline in
PyTorch, same initial latents, fp32, 4 steps."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from latentrt.runtime.pipeline import Pipeline

# Alternative schedulers, swapped into a copy of a preset's bundle (the ONNX files do not change).
EULER_V = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    steps_offset=1,  # StableDiffusionPipeline would force it
)
DDIM_V = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="v_prediction",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)


@pytest.fixture(scope="module")
def unet_case(tmp_path_factory):
    """`unet_case(preset, scheduler=None)`: (diffusers pipeline, latentrt Pipeline) on the same weights;
    `scheduler` = (diffusers scheduler class name, config) replaces the preset's scheduler in both."""
    import diffusers

    from latentrt.export.pipeline import export_pipeline
    from latentrt.models.presets import save_preset

    root = tmp_path_factory.mktemp("unet")
    cache = {}

    def get(preset: str, scheduler: tuple[str, dict] | None = None):
        key = (preset, json.dumps(scheduler))
        if key in cache:
            return cache[key]
        if scheduler is None:
            source = save_preset(preset, root / f"{preset}-source")
            bundle = root / preset
            export_pipeline(source, bundle)
            if preset == "tiny-sdxl":
                reference = diffusers.StableDiffusionXLPipeline.from_pretrained(source, use_safetensors=True, add_watermarker=False)
            else:
                reference = diffusers.StableDiffusionPipeline.from_pretrained(source, use_safetensors=True)
        else:
            base, base_ours = get(preset)
            class_name, config = scheduler
            swapped = getattr(diffusers, class_name).from_config(config)
            reference = type(base)(**{**base.components, "scheduler": swapped})
            bundle = root / f"{preset}-{class_name}-{len(cache)}"
            shutil.copytree(base_ours.bundle, bundle)
            manifest = json.loads((bundle / "manifest.json").read_text())
            manifest["scheduler"] = {"class_name": class_name, "config": dict(reference.scheduler.config)}
            (bundle / "manifest.json").write_text(json.dumps(manifest))
        reference.set_progress_bar_config(disable=True)
        cache[key] = (reference, Pipeline.load(bundle))
        return cache[key]

    return get


def run_both(reference, ours, kwargs: dict) -> tuple[np.ndarray, np.ndarray]:
    n = len(kwargs["prompt"])
    latents = np.random.default_rng(7).standard_normal((n, 4, kwargs["height"] // 8, kwargs["width"] // 8), dtype=np.float32)
    expected = reference(**kwargs, num_inference_steps=4, latents=torch.from_numpy(latents), output_type="np").images
    out = ours(**kwargs, num_inference_steps=4, latents=latents)
    assert out.pixels.shape == expected.shape
    assert len(out.images) == n and out.images[0].size == (kwargs["width"], kwargs["height"])
    return out.pixels, expected


CASES = [
    ("tiny-sd15", None, dict(prompt=["a red cat on the left"], guidance_scale=7.5, height=64, width=64)),
    (
        "tiny-sd15",
        None,
        dict(prompt=["a blue house", "a tiny robot at night"], negative_prompt=["", "blurry"], guidance_scale=5.0, height=48, width=80),
    ),
    ("tiny-sd15", None, dict(prompt=["a green tree"], guidance_scale=1.0, height=80, width=64)),
    ("tiny-sd15", ("EulerDiscreteScheduler", EULER_V), dict(prompt=["a white dog in the snow"], guidance_scale=6.0, height=64, width=64)),
    ("tiny-sdxl", None, dict(prompt=["a red cat on the left"], guidance_scale=5.0, height=64, width=64)),
    (
        "tiny-sdxl",
        None,
        dict(prompt=["a blue house", "a tiny robot"], negative_prompt="a black car at night", guidance_scale=4.0, height=48, width=80),
    ),
    ("tiny-sdxl", ("DDIMScheduler", DDIM_V), dict(prompt=["a small orange circle"], guidance_scale=5.0, height=64, width=48)),
]
IDS = [
    "sd15-ddim-cfg",
    "sd15-ddim-negative-batch2-nonsquare",
    "sd15-ddim-no-cfg",
    "sd15-euler-vpred",
    "sdxl-euler-cfg-zero-negative",
    "sdxl-euler-negative-batch2-nonsquare",
    "sdxl-ddim-vpred",
]


@pytest.mark.parametrize("preset, scheduler, kwargs", CASES, ids=IDS)
def test_images_match_diffusers(unet_case, preset, scheduler, kwargs):
    pixels, expected = run_both(*unet_case(preset, scheduler), kwargs)
    assert np.abs(pixels - expected).max() <= 2e-3


def test_sdxl_conditioning_matches_encode_prompt(unet_case):
    reference, ours = unet_case("tiny-sdxl")
    prompts = ["a photo of a large purple mountain in the snow", "a car"]
    embeds, negative, pooled, negative_pooled = reference.encode_prompt(prompts, do_classifier_free_guidance=True)
    cond = ours.family.conditioning(prompts, None, cfg=True, height=64, width=48, max_sequence_length=77)

    np.testing.assert_allclose(cond["encoder_hidden_states"][2:], embeds.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(cond["text_embeds"][2:], pooled.detach().numpy(), atol=1e-5)
    assert not negative.any() and not negative_pooled.any()  # force_zeros_for_empty_prompt
    assert not cond["encoder_hidden_states"][:2].any() and not cond["text_embeds"][:2].any()
    np.testing.assert_array_equal(cond["time_ids"], [[64, 48, 0, 0, 64, 48]] * 4)


def test_sd15_conditioning_is_the_last_hidden_state(unet_case):
    reference, ours = unet_case("tiny-sd15")
    prompts = ["", "a photo of a large purple mountain in the snow"]
    embeds, negative = reference.encode_prompt(prompts, "cpu", 1, True, negative_prompt=["a tree", "a dog"])
    cond = ours.family.conditioning(prompts, ["a tree", "a dog"], cfg=True, height=64, width=64, max_sequence_length=77)

    expected = np.concatenate([negative.detach().numpy(), embeds.detach().numpy()])
    np.testing.assert_allclose(cond["encoder_hidden_states"], expected, atol=1e-5)


def test_manifest_describes_the_unet_pipelines(unet_case):
    sd15 = unet_case("tiny-sd15")[1].manifest
    sdxl = unet_case("tiny-sdxl")[1].manifest

    assert sd15.family == "sd15" and sdxl.family == "sdxl"
    assert sd15.defaults.height == sd15.defaults.width == 64  # unet sample_size 8 x vae scale factor 8
    assert sd15.scheduler["class_name"] == "DDIMScheduler" and sdxl.scheduler["class_name"] == "EulerDiscreteScheduler"
    assert [i.name for i in sdxl.components["unet"].inputs] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert sdxl.components["unet"].input("timestep").dtype == "float32"
    assert sdxl.components["unet"].input("encoder_hidden_states").shape == ("batch", 77, 64)
    assert sd15.latent.channels == 4 and sd15.latent.shift_factor == 0.0 and sd15.latent.scaling_factor == pytest.approx(0.18215)
    assert sdxl.conditioning["force_zeros_for_empty_prompt"] is True

"""latentrt against diffusers' FluxPipeline on tiny-flux: packed latents, guidance embedding, dynamic shift."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentrt.runtime.families.flux import image_ids, pack_latents, unpack_latents
from latentrt.bundle.manifest import load_manifest
from latentrt.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def flux_source(preset_source):
    return preset_source("tiny-flux")


@pytest.fixture(scope="module")
def flux_bundle(preset_bundle):
    return preset_bundle("tiny-flux")


def test_packing_matches_diffusers():
    from diffusers import FluxPipeline

    x = np.random.default_rng(0).standard_normal((2, 16, 6, 10), dtype=np.float32)
    packed = FluxPipeline._pack_latents(torch.from_numpy(x), 2, 16, 6, 10).numpy()
    np.testing.assert_array_equal(pack_latents(x), packed)
    np.testing.assert_array_equal(unpack_latents(packed, 6, 10), x)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(image_ids(6, 10), ids)


def test_manifest(flux_bundle):
    m = load_manifest(flux_bundle)
    transformer = m.components["transformer"]
    assert [s.name for s in transformer.inputs] == [
        "hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids", "guidance"
    ]
    assert transformer.input("img_ids").shape == ("image_tokens", 3)
    assert m.conditioning["guidance_embeds"] is True and m.defaults.height == 256


@pytest.mark.parametrize("height,width,guidance", [(64, 64, 3.5), (48, 80, 5.0)])
def test_images_match_diffusers(flux_source, flux_bundle, height, width, guidance):
    from diffusers import FluxPipeline

    reference = FluxPipeline.from_pretrained(flux_source, use_safetensors=True)
    prompts = ["a red cat on the left", "a blue house at night"]
    latents = np.random.default_rng(3).standard_normal((2, (height // 4) * (width // 4), 64), dtype=np.float32)
    common = dict(num_inference_steps=4, guidance_scale=guidance, height=height, width=width, max_sequence_length=32)
    expected = reference(prompts, latents=torch.from_numpy(latents), output_type="np", **common).images
    out = Pipeline.load(flux_bundle)(prompts, latents=latents, **common)
    assert out.pixels.shape == expected.shape == (2, height, width, 3)
    assert np.abs(out.pixels - expected).max() <= 2e-3

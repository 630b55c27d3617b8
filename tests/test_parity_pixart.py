"""latentrt against diffusers' PixArtAlphaPipeline on tiny-pixart: masked T5, learned sigma, DDIM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentrt.bundle.manifest import load_manifest
from latentrt.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def pixart_source(preset_source):
    return preset_source("tiny-pixart")


@pytest.fixture(scope="module")
def pixart_bundle(preset_bundle):
    return preset_bundle("tiny-pixart")


def test_manifest(pixart_bundle):
    m = load_manifest(pixart_bundle)
    assert [s.name for s in m.components["text_encoder"].inputs] == ["input_ids", "attention_mask"]
    assert m.components["transformer"].outputs[0].shape == ("batch", 8, "latent_height", "latent_width")
    assert m.conditioning["learned_sigma"] is True and m.scheduler["class_name"] == "DDIMScheduler"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(prompt=["a red cat on the left"], guidance_scale=4.5, height=64, width=64),
        dict(prompt=["a blue house", "a tiny robot"], negative_prompt="blurry", guidance_scale=3.0, height=48, width=96),
    ],
)
def test_images_match_diffusers(pixart_source, pixart_bundle, kwargs):
    from diffusers import PixArtAlphaPipeline

    reference = PixArtAlphaPipeline.from_pretrained(pixart_source, use_safetensors=True)
    n = len(kwargs["prompt"])
    latents = np.random.default_rng(5).standard_normal((n, 4, kwargs["height"] // 8, kwargs["width"] // 8), dtype=np.float32)
    expected = reference(
        **kwargs, num_inference_steps=4, latents=torch.from_numpy(latents), output_type="np",
        use_resolution_binning=False, clean_caption=False, max_sequence_length=120,
    ).images
    out = Pipeline.load(pixart_bundle)(**kwargs, num_inference_steps=4, latents=latents)
    assert out.pixels.shape == expected.shape
    assert np.abs(out.pixels - expected).max() <= 2e-3

"""latentrt on ONNX Runtime against diffusers' StableDiffusion3Pipeline in PyTorch, same initial latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentrt.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def reference(tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, use_safetensors=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(prompt=["a red cat on the left"], guidance_scale=5.0, height=128, width=128),
        dict(prompt=["a blue house", "a tiny robot at night"], negative_prompt=["", "blurry"], guidance_scale=4.0, height=96, width=160),
        dict(prompt=["a green tree"], guidance_scale=1.0, height=128, width=64, max_sequence_length=32),
    ],
    ids=["cfg-square", "cfg-batch2-nonsquare", "no-cfg-short-t5"],
)
def test_images_match_diffusers(reference, tiny_sd3_bundle, kwargs):
    steps = 4
    n = len(kwargs["prompt"])
    latents = np.random.default_rng(7).standard_normal((n, 16, kwargs["height"] // 8, kwargs["width"] // 8), dtype=np.float32)

    expected = reference(
        **kwargs, num_inference_steps=steps, latents=torch.from_numpy(latents), output_type="np"
    ).images
    out = Pipeline.load(tiny_sd3_bundle)(**kwargs, num_inference_steps=steps, latents=latents)

    assert out.pixels.shape == expected.shape
    assert np.abs(out.pixels - expected).max() <= 2e-3
    assert len(out.images) == n and out.images[0].size == (kwargs["width"], kwargs["height"])


def test_prompt_encoding_matches_diffusers(reference, tiny_sd3_bundle):
    prompts = ["", "a photo of a large purple mountain in the snow"]
    embeds, _, pooled, _ = reference.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False, max_sequence_length=256)
    cond = Pipeline.load(tiny_sd3_bundle).family.conditioning(prompts, None, cfg=False, height=128, width=128, max_sequence_length=256)
    np.testing.assert_allclose(cond["encoder_hidden_states"], embeds.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(cond["pooled_projections"], pooled.detach().numpy(), atol=1e-5)

"""Pipeline behaviour that does not need a reference: determinism, argument checks, no torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from latentrt.errors import InputError
from latentrt.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipe(tiny_sd3_bundle):
    return Pipeline.load(tiny_sd3_bundle)


def test_same_seed_same_image_bit_for_bit(pipe):
    a = pipe("a red cat", num_inference_steps=3, seed=11)
    b = pipe("a red cat", num_inference_steps=3, seed=11)
    c = pipe("a red cat", num_inference_steps=3, seed=12)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert np.abs(a.pixels - c.pixels).max() > 1e-3


def test_negative_prompts_are_encoded_once(tiny_sd3_bundle):
    """With guidance, the negative prompt's rows are kept: later calls encode only their prompts,
    and give the image a pipeline without kept rows gives."""
    pipe = Pipeline.load(tiny_sd3_bundle)
    batches = []
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        engine = pipe.engines[name]
        pipe.engines[name] = lambda feeds, engine=engine, name=name: batches.append((name, len(feeds["input_ids"]))) or engine(feeds)
    first = pipe(["a red cat", "a blue dog"], negative_prompt="blurry", num_inference_steps=2, seed=4)
    assert batches == [(name, 4) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    batches.clear()
    second = pipe(["a red cat", "a blue dog"], negative_prompt="blurry", num_inference_steps=2, seed=4)
    assert batches == [(name, 2) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    np.testing.assert_allclose(second.pixels, first.pixels, atol=1e-5)
    batches.clear()
    pipe(["a red cat"], negative_prompt=["sharp"], num_inference_steps=1, seed=4)
    assert batches == [(name, 2) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    fresh = Pipeline.load(tiny_sd3_bundle)(["a red cat", "a blue dog"], negative_prompt="blurry", num_inference_steps=2, seed=4)
    np.testing.assert_allclose(second.pixels, fresh.pixels, atol=1e-5)


def test_outputs_and_timings(pipe):
    out = pipe(["a red cat", "a blue dog"], num_inference_steps=3, num_images_per_prompt=2, height=64, width=96, seed=0)
    assert out.pixels.shape == (4, 64, 96, 3) and out.pixels.dtype == np.float32
    assert 0.0 <= out.pixels.min() and out.pixels.max() <= 1.0
    assert [im.size for im in out.images] == [(96, 64)] * 4
    assert len(out.timings["denoising_steps"]) == 3
    assert out.timings["total"] >= out.timings["text_encoding"] + sum(out.timings["denoising_steps"]) + out.timings["vae_decode"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(height=100), "height 100 is not valid.*multiple of 16.*nearest valid height is 96"),
        (dict(width=8), "width 8 is not valid.*between 32 and 768.*nearest valid width is 32"),
        (dict(height=1024), "height 1024 is not valid.*nearest valid height is 768"),
        (dict(num_inference_steps=0), "num_inference_steps must be >= 1"),
        (dict(latents=np.zeros((1, 4, 16, 16), np.float32)), r"latents have shape \(1, 4, 16, 16\), expected \(1, 16, 16, 16\)"),
        (dict(negative_prompt=["a", "b"]), "2 negative prompts for 1 prompts"),
    ],
)
def test_bad_arguments(pipe, kwargs, message):
    with pytest.raises(InputError, match=message):
        pipe("a red cat", **kwargs)


def test_more_images_than_the_batch_range_run_in_chunks(pipe):
    """tiny-sd3 is exported for 4 images per call; 6 run as 4 + 2 with the same latents as one by one."""
    latents = np.random.default_rng(3).standard_normal((6, 16, 8, 8), dtype=np.float32)
    prompts = [f"a red cat {i}" for i in range(6)]
    out = pipe(prompts, num_inference_steps=2, height=64, width=64, latents=latents)
    assert out.pixels.shape == (6, 64, 64, 3) and len(out.timings["denoising_steps"]) == 2
    single = pipe(prompts[5], num_inference_steps=2, height=64, width=64, latents=latents[5:])
    np.testing.assert_allclose(out.pixels[5], single.pixels[0], atol=1e-5)


def test_runtime_never_imports_torch(tiny_sd3_bundle):
    """Generate in a subprocess where importing torch, diffusers or transformers fails."""
    script = textwrap.dedent(
        f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "diffusers", "transformers"):
                    raise ImportError("blocked: " + name)

        sys.meta_path.insert(0, Block())
        from latentrt import Pipeline
        out = Pipeline.load({str(tiny_sd3_bundle)!r})("a red cat", num_inference_steps=2, seed=0)
        assert out.pixels.shape == (1, 128, 128, 3)
        assert not any(m.split(".")[0] in ("torch", "diffusers", "transformers") for m in sys.modules)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"

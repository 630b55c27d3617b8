"""Fixtures for the calibration tests: tiny-sd3 quantized once per session, and real denoiser inputs.

Calibration uses 2 prompts x 3 steps (with guidance: 6 denoiser calls of batch 4), which takes about
a second on tiny-sd3.
"""

from __future__ import annotations

import numpy as np
import pytest

from latentrt.calibration.quantize import QuantizeConfig, quantize_bundle

FAST = dict(num_prompts=2, steps=3)
HELD_OUT = ["a blue circle on the right", "a photo of a horse in a misty meadow"]


@pytest.fixture(scope="session")
def fp8_bundle(tiny_sd3_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration") / "fp8"
    quantize_bundle(tiny_sd3_bundle, out, QuantizeConfig(precision="fp8", **FAST))
    return out


@pytest.fixture(scope="session")
def denoiser_feeds(tiny_sd3_bundle):
    """Every denoiser call of a 3-step generation on two held-out prompts (with guidance: batch 4)."""
    from latentrt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(tiny_sd3_bundle)
    engine = pipe.engines["transformer"]
    feeds = []

    def record(f):
        feeds.append({k: np.array(v) for k, v in f.items()})
        return engine(f)

    pipe.engines["transformer"] = record
    pipe(HELD_OUT, num_inference_steps=3, seed=123)
    return feeds

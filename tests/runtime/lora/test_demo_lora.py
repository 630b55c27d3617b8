"""The shipped demo LoRA (models/demo/lora, trained by `models/demo/train_lora.py`) on the exported demo
model: it loads as the diffusers file it is, turns a grey background navy, leaves the shape alone, and
switching it off gives the bundle's image back bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from latentrt.models.demo import analyser
from latentrt.runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[3]
LORA = ROOT / "models" / "demo" / "lora" / "pytorch_lora_weights.safetensors"
PROMPT = "a large red circle on the left on a grey background"


@pytest.mark.slow  # exports the demo model (~25 s on 2 cores)
def test_shipped_lora_is_small_and_turns_the_background_navy(demo_bundle):
    assert LORA.stat().st_size < 1_000_000
    with Pipeline.load(demo_bundle, threads=1) as pipe:
        call = dict(prompt=[PROMPT], num_inference_steps=16, guidance_scale=3.0, seed=0)
        base = pipe(**call).pixels[0]
        pipe.load_lora_weights(LORA, adapter_name="navy")
        assert sorted(pipe.lora.adapters["navy"].components) == ["transformer"]
        navy = pipe(**call).pixels[0]
        pipe.set_adapters([])
        np.testing.assert_array_equal(pipe(**call).pixels[0], base)
    before, after = analyser.analyse(base), analyser.analyse(navy)
    assert before["background"] == "grey" and after["background"] == "navy"
    assert before["shape"] == after["shape"] == "circle"
    assert float(np.abs(navy - base).mean()) > 0.05

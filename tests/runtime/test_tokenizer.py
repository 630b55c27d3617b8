"""PromptTokenizer against the transformers tokenizers diffusers calls, on the bundle's tokenizer.json."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from transformers import AutoTokenizer

from latentrt.bundle.manifest import load_manifest
from latentrt.runtime.tokenizer import PromptTokenizer

PROMPTS = ["", "a red cat", "A Large PURPLE mountain   in the snow, at night!", "zebra xylophone 123 éà"]


@pytest.mark.parametrize("name,length", [("tokenizer", None), ("tokenizer_3", 256), ("tokenizer_3", 7)])
def test_matches_transformers_padding_and_truncation(tiny_sd3_dir, tiny_sd3_bundle, name, length):
    spec = load_manifest(tiny_sd3_bundle).tokenizers[name]
    ours = PromptTokenizer(tiny_sd3_bundle / spec.file, max_length=spec.max_length, pad_id=spec.pad_id)
    reference = AutoTokenizer.from_pretrained(tiny_sd3_dir / name)
    max_length = length or reference.model_max_length
    expected = reference(PROMPTS, padding="max_length", max_length=max_length, truncation=True).input_ids
    np.testing.assert_array_equal(ours(PROMPTS, length), np.array(expected, dtype=np.int64))


def test_truncation_warns_with_dropped_text(tiny_sd3_bundle, caplog):
    spec = load_manifest(tiny_sd3_bundle).tokenizers["tokenizer"]
    tok = PromptTokenizer(tiny_sd3_bundle / spec.file, max_length=6, pad_id=spec.pad_id)
    with caplog.at_level(logging.WARNING, logger="latentrt.runtime.tokenizer"):
        ids = tok(["a red cat on the left at night in the snow"])
    assert ids.shape == (1, 6)
    assert ids[0, -1] == spec.pad_id  # the end token (CLIP pads with it) is kept after truncation
    assert "truncated" in caplog.text and "snow" in caplog.text

"""Planted cases on tiny-sd3: a T5 whose FFN overflows fp16, an attention output with an outlier channel."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def t5_overflow(preset_source, tmp_path_factory):
    """(fp32 bundle, naive fp16 copy, fp16 copy with export's islands, overflowing node) for text_encoder_3."""
    from latentrt.debug.cases import islands_half_bundle, naive_half_bundle, plant_t5_overflow
    from latentrt.export.pipeline import export_pipeline

    root = tmp_path_factory.mktemp("t5-overflow")
    source = shutil.copytree(preset_source("tiny-sd3"), root / "source")
    node = plant_t5_overflow(source)
    export_pipeline(source, root / "fp32")
    naive = naive_half_bundle(root / "fp32", root / "naive", "text_encoder_3")
    islands = islands_half_bundle(root / "fp32", root / "islands", "text_encoder_3")
    return root / "fp32", naive, islands, node


@pytest.fixture(scope="session")
def attention_outlier(preset_source, tmp_path_factory):
    """(fp32 bundle with an outlier channel in the last block's attention output, its int8 calibration, the planted layer)."""
    from latentrt.calibration.quantize import QuantizeConfig, quantize_bundle
    from latentrt.debug.cases import plant_attention_outlier
    from latentrt.export.pipeline import export_pipeline

    root = tmp_path_factory.mktemp("outlier")
    source = shutil.copytree(preset_source("tiny-sd3"), root / "source")
    node = plant_attention_outlier(source, factor=300.0)
    export_pipeline(source, root / "fp32")
    quantize_bundle(root / "fp32", root / "int8", QuantizeConfig(precision="int8", num_prompts=2, steps=3))
    return root / "fp32", root / "int8", node

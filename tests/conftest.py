"""Shared fixtures: tiny preset pipeline directories and their bundles, and the demo bundle, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory):
    """The shipped demo model (models/demo/pipeline) exported as `make demo` exports it."""
    from latentrt.export.pipeline import ExportConfig, export_pipeline

    out = tmp_path_factory.mktemp("demo") / "bundle"
    export_pipeline(ROOT / "models" / "demo" / "pipeline", out, ExportConfig(max_sequence_length=0))
    return out


@pytest.fixture(scope="session")
def preset_source(tmp_path_factory):
    """`preset_source(name)`: the diffusers pipeline directory of a built-in preset (built once)."""
    from latentrt.models.presets import save_preset

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = save_preset(name, tmp_path_factory.mktemp(f"{name}-source"))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def preset_bundle(preset_source, tmp_path_factory):
    """`preset_bundle(name)`: the fp32 bundle exported from `preset_source(name)` with defaults (built once)."""
    from latentrt.export.pipeline import export_pipeline

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = tmp_path_factory.mktemp("bundles") / name
            export_pipeline(preset_source(name), cache[name])
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_sd3_dir(preset_source):
    return preset_source("tiny-sd3")


@pytest.fixture(scope="session")
def tiny_sd3_bundle(preset_bundle):
    return preset_bundle("tiny-sd3")


@pytest.fixture(scope="session")
def int8_bundle(tiny_sd3_bundle, tmp_path_factory):
    """tiny-sd3 calibrated to int8 on 2 prompts x 3 steps (about a second)."""
    from latentrt.calibration.quantize import QuantizeConfig, quantize_bundle

    out = tmp_path_factory.mktemp("calibration") / "int8"
    quantize_bundle(tiny_sd3_bundle, out, QuantizeConfig(precision="int8", num_prompts=2, steps=3))
    return out

"""Every preset exports, validates, generates (ONNX Runtime CPU) and builds (TensorRT-RTX, SM 8.6 + 8.9)
in fp32 and fp16; bf16 exports and validates."""

from __future__ import annotations

import numpy as np
import pytest

from latentrt.engines import BuildConfig, build_engines, is_available
from latentrt.export.pipeline import HALF_TOLERANCE, ExportConfig, export_pipeline
from latentrt.bundle.manifest import load_manifest
from latentrt.runtime.pipeline import Pipeline

PRESETS = ["tiny-sd3", "tiny-flux", "tiny-pixart", "tiny-sd15", "tiny-sdxl"]


@pytest.fixture(scope="module")
def sources(preset_source):
    return {name: preset_source(name) for name in PRESETS}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_export_validate_generate(sources, tmp_path, preset, precision):
    bundle = tmp_path / "bundle"
    export_pipeline(sources[preset], bundle, ExportConfig(precision=precision, max_sequence_length=32))
    m = load_manifest(bundle)
    tolerance = 1e-4 if precision == "fp32" else HALF_TOLERANCE[precision]
    for name, comp in m.components.items():
        assert comp.precision == precision, name
        assert [i.dtype for i in comp.inputs if i.dtype.startswith("float")] == ["float32"] * sum(
            i.dtype.startswith("float") for i in comp.inputs
        )
        assert all(0 <= err <= tolerance for v in comp.validation for err in v.rel_l2.values()), name
        if precision == "fp16":
            assert comp.precision_report["precision"] == "fp16" and comp.precision_report["kept_fp32"], name
    out = Pipeline.load(bundle)("a red cat on the left", num_inference_steps=2, seed=0, height=64, width=64)
    assert out.pixels.shape == (1, 64, 64, 3) and np.isfinite(out.pixels).all()
    assert out.pixels.std() > 0.01  # not a flat (black) image
    _build_all(bundle, m)


def _build_all(bundle, manifest):
    """Real ahead-of-time TensorRT-RTX builds of every component; skipped without the wheels."""
    if not is_available("tensorrt-rtx"):
        pytest.skip("TensorRT-RTX wheels (tensorrt-rtx-cu13-*) are not installed")
    config = BuildConfig(compute_capabilities=("8.6", "8.9"), batch=(1, 1, 1), image_size=((64, 64), (64, 64), (128, 128)), opt_level=0)
    results = build_engines(bundle, config)
    assert {r.component for r in results} == set(manifest.components)
    for r in results:
        assert r.status == "built" and r.record.engine_bytes > 0 and r.engine.stat().st_size == r.record.engine_bytes
        assert [t.name for t in r.network.inputs] == [s.name for s in manifest.components[r.component].inputs]


def test_bf16_exports_and_validates(sources, tmp_path):
    bundle = tmp_path / "bundle"
    export_pipeline(sources["tiny-sd3"], bundle, ExportConfig(precision="bf16", max_sequence_length=32))
    m = load_manifest(bundle)
    for comp in m.components.values():
        assert comp.precision == "bf16" and comp.opset == 22
        assert max(e for v in comp.validation for e in v.rel_l2.values()) <= HALF_TOLERANCE["bf16"]


def test_vae_can_stay_fp32(sources, tmp_path):
    bundle = tmp_path / "bundle"
    export_pipeline(sources["tiny-sd15"], bundle, ExportConfig(precision="fp16", vae_precision="fp32"))
    m = load_manifest(bundle)
    assert m.components["vae_decoder"].precision == "fp32" and m.components["unet"].precision == "fp16"

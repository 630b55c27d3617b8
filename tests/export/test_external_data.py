"""Models over 2 GB are written with external data, and bundles that use it load and run."""

from __future__ import annotations

import pytest

from latentrt.export import onnx_export
from latentrt.export.pipeline import export_pipeline
from latentrt.bundle.manifest import load_manifest
from latentrt.runtime.pipeline import Pipeline


def test_bundle_with_external_data_files(tiny_sd3_dir, tmp_path, monkeypatch):
    # Same code path as a >2 GB model, at tiny size: every component goes to external data.
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    bundle = tmp_path / "bundle"
    export_pipeline(tiny_sd3_dir, bundle)
    m = load_manifest(bundle)
    assert m.components["transformer"].external_data == ("onnx/transformer.onnx.data",)
    assert (bundle / "onnx" / "transformer.onnx.data").stat().st_size > (bundle / "onnx" / "transformer.onnx").stat().st_size
    assert Pipeline.load(bundle)("a red cat", num_inference_steps=2, seed=0).pixels.shape == (1, 128, 128, 3)


@pytest.mark.slow
def test_real_model_over_2gb(tmp_path):
    """A T5 encoder with 2.2 GB of fp32 weights: ~1 min and ~6 GB peak RSS on 2 cores."""
    import torch
    from transformers import T5Config, T5EncoderModel

    from latentrt.models.sd3 import T5EncoderAdapter
    from latentrt.models.spec import ComponentExport, TensorTemplate
    from latentrt.bundle.manifest import AxisRange

    config = T5Config(vocab_size=32128, d_model=1024, d_kv=64, d_ff=32768, num_layers=5, num_heads=16, feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    model = T5EncoderModel(config)
    assert onnx_export.parameter_bytes(model) > 2**31
    comp = ComponentExport(
        name="text_encoder_3",
        module=T5EncoderAdapter(model),
        inputs=(TensorTemplate("input_ids", ("batch", "sequence"), "int64", 0, 32128),),
        outputs=(TensorTemplate("last_hidden_state", ("batch", "sequence", 1024)),),
        axes={"batch": AxisRange(1, 1, 2), "sequence": AxisRange(1, 8, 64)},
        trace_sizes={"batch": 1, "sequence": 8},
        validate_sizes=({"batch": 1, "sequence": 8}, {"batch": 2, "sequence": 12}),
    )
    path = tmp_path / "text_encoder_3.onnx"
    assert onnx_export.export_component(comp, path) == ["text_encoder_3.onnx.data"]
    assert path.stat().st_size < 2**20 and (tmp_path / "text_encoder_3.onnx.data").stat().st_size > 2**31
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text_encoder_3.onnx", "text_encoder_3.onnx.data"]
    results = onnx_export.validate_component(comp, path, tolerance=1e-4)
    assert all(v.rel_l2["last_hidden_state"] < 1e-4 for v in results)
    inputs, outputs = onnx_export.io_specs(path)  # shape inference through the path-based API
    assert outputs[0].shape == ("batch", "sequence", 1024)

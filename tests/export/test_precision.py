"""Half precision with fp32 islands: T5's fp16 overflow is caught, and every tiny-sd3 component converts."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from latentrt.errors import InputError
from latentrt.export.onnx_export import export_component, make_inputs, rel_l2, validate_component
from latentrt.export.precision import PrecisionReport, convert_precision, record_ranges, simulation_model
from latentrt.models.sd3 import T5EncoderAdapter
from latentrt.models.spec import ComponentExport, TensorTemplate
from latentrt.bundle.manifest import AxisRange

FLOAT, FLOAT16, BFLOAT16 = 1, 10, 16
WO = "/model/encoder/block.0/layer.1/DenseReluDense/wo/MatMul"


def _weight_bytes(model, dtypes) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer if t.data_type in dtypes)


def _run(path, feed):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.fixture(scope="module")
def overflowing_t5(tmp_path_factory):
    """A 2-layer T5 encoder whose first FFN output reaches ~1e6, as T5-XXL's do in fp16."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="relu")
    torch.manual_seed(0)
    model = T5EncoderModel(config).eval()
    with torch.no_grad():
        model.encoder.block[0].layer[1].DenseReluDense.wo.weight.mul_(1e5)
    comp = ComponentExport(
        name="text_encoder_3",
        module=T5EncoderAdapter(model),
        inputs=(TensorTemplate("input_ids", ("batch", "sequence"), "int64", 0, 64),),
        outputs=(TensorTemplate("last_hidden_state", ("batch", "sequence", 32)),),
        axes={"batch": AxisRange(1, 1, 2), "sequence": AxisRange(1, 8, 32)},
        trace_sizes={"batch": 1, "sequence": 8},
        validate_sizes=({"batch": 2, "sequence": 12},),
    )
    path = tmp_path_factory.mktemp("t5") / "text_encoder_3.onnx"
    export_component(comp, path)
    return comp, path


def test_t5_overflow_is_kept_fp32(overflowing_t5, tmp_path):
    comp, path = overflowing_t5
    calibration = [{"input_ids": make_inputs(comp.inputs, {"batch": 2, "sequence": 16}, seed=s)["input_ids"].numpy()} for s in (10, 11)]
    ids = make_inputs(comp.inputs, {"batch": 2, "sequence": 12}, seed=1)["input_ids"]
    with torch.no_grad():
        expected = comp.module(ids).numpy()
    feed = {"input_ids": ids.numpy()}

    ranges = record_ranges(path, calibration)
    assert ranges[WO + "_output_0"] > 65504

    naive = convert_precision(path, tmp_path / "naive.onnx", "fp16", None, keep_fp32_ops=())
    assert naive.kept_fp32 == {k: "index" for k in naive.kept_fp32}  # only T5's relative-position buckets
    simulation_model(tmp_path / "naive.onnx", tmp_path / "naive.sim.onnx")
    assert not np.isfinite(_run(tmp_path / "naive.sim.onnx", feed)).all()

    report = convert_precision(path, tmp_path / "fp16.onnx", "fp16", ranges)
    assert report.kept_fp32[WO] == "overflow"
    simulation_model(tmp_path / "fp16.onnx", tmp_path / "fp16.sim.onnx")
    actual = _run(tmp_path / "fp16.sim.onnx", feed)
    assert np.isfinite(actual).all()
    assert rel_l2(actual, expected) <= 1e-2
    # The same check through the exporter's validation (PyTorch at the component's validate sizes).
    assert validate_component(comp, tmp_path / "fp16.sim.onnx", tolerance=1e-2)[0].rel_l2["last_hidden_state"] <= 1e-2


def test_native_ort_cpu_fp16_hides_the_overflow(overflowing_t5, tmp_path):
    """ORT CPU runs MatMul/Add/... of an fp16 graph in float32 (inserted Casts), so it misses what fp16 hardware sees."""
    comp, path = overflowing_t5
    convert_precision(path, tmp_path / "naive.onnx", "fp16", None, keep_fp32_ops=())
    simulation_model(tmp_path / "naive.onnx", tmp_path / "naive.sim.onnx")
    feed = {"input_ids": make_inputs(comp.inputs, {"batch": 1, "sequence": 8}, seed=3)["input_ids"].numpy()}
    assert not np.isfinite(_run(tmp_path / "naive.sim.onnx", feed)).all()
    assert np.isfinite(_run(tmp_path / "naive.onnx", feed)).all()


def test_external_data_in_and_out(overflowing_t5, tmp_path, monkeypatch):
    """The >2 GB code path at tiny size: external data read by record_ranges and convert, written by convert."""
    from latentrt.export import onnx_export, precision

    comp, _ = overflowing_t5
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(precision, "EXTERNAL_DATA_THRESHOLD", 0)
    source = tmp_path / "fp32" / "t5.onnx"
    source.parent.mkdir()
    assert export_component(comp, source) == ["t5.onnx.data"]
    feed = {"input_ids": make_inputs(comp.inputs, {"batch": 1, "sequence": 8}, seed=4)["input_ids"].numpy()}
    out = tmp_path / "fp16" / "t5.onnx"
    for _ in range(2):  # a second conversion replaces the data file instead of appending to it
        report = convert_precision(source, out, "fp16", record_ranges(source, [feed]))
    assert report.external_data == ("t5.onnx.data",)
    assert sorted(p.name for p in out.parent.iterdir()) == ["t5.onnx", "t5.onnx.data"]
    # Every weight is halved but the scaled `wo` (64 x 32), which feeds the overflowing MatMul.
    assert report.fp32_initializers == 1
    assert _weight_bytes(onnx.load(str(out)), (FLOAT16, FLOAT)) == _weight_bytes(onnx.load(str(source)), (FLOAT,)) // 2 + 64 * 32 * 2
    assert sorted(p.name for p in source.parent.iterdir()) == ["t5.onnx", "t5.onnx.data"]  # no scratch left
    check = simulation_model(out, tmp_path / "check" / "t5.onnx")
    assert rel_l2(_run(check, feed), _run(source, feed)) <= 1e-2


@pytest.fixture(scope="module")
def tiny_sd3_components(tiny_sd3_dir):
    from latentrt.models import families
    from latentrt.models.loader import load_pipeline, read_model_index

    family = families.for_pipeline_class(read_model_index(tiny_sd3_dir)["_class_name"], tiny_sd3_dir)
    spec = family.describe(load_pipeline(tiny_sd3_dir, family.required, family.optional).load_weights())
    return {c.name: c for c in spec.components}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name", ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder"])
def test_tiny_sd3_component(tiny_sd3_bundle, tiny_sd3_components, tmp_path, name, precision):
    comp = tiny_sd3_components[name]
    source = tiny_sd3_bundle / "onnx" / f"{name}.onnx"
    feeds = [{k: v.numpy() for k, v in make_inputs(comp.inputs, comp.trace_sizes, seed=100 + s).items()} for s in range(2)]
    out = tmp_path / f"{name}.onnx"
    opset = 22 if precision == "bf16" else None  # bf16 Conv / InstanceNormalization need opset 22
    report = convert_precision(source, out, precision, record_ranges(source, feeds), opset=opset)

    model = onnx.load(str(out))
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)  # every dtype meets its op's spec
    before = onnx.load(str(source))
    assert [(v.name, v.type.tensor_type.elem_type) for v in model.graph.input] == [
        (v.name, v.type.tensor_type.elem_type) for v in before.graph.input
    ]
    assert {v.type.tensor_type.elem_type for v in model.graph.output} == {FLOAT}
    half = FLOAT16 if precision == "fp16" else BFLOAT16
    assert _weight_bytes(model, (half,)) > 0.95 * _weight_bytes(model, (half, FLOAT))
    assert _weight_bytes(model, (half, FLOAT)) < 0.52 * _weight_bytes(before, (FLOAT,))
    assert out.stat().st_size < 0.75 * source.stat().st_size  # tiny graphs: node names weigh as much as weights
    assert report.half_nodes > 0 and not any(r == "overflow" for r in report.kept_fp32.values())

    # bf16 stores 8 significant bits (unit roundoff 2**-9, 8x fp16's): with every stored tensor rounded,
    # random tiny models reach 0.6-1.2e-2 (text encoders, transformer) and ~2e-2 (the VAE's ~30 layers).
    tolerance = 1e-2 if precision == "fp16" else 3e-2
    check = simulation_model(out, tmp_path / f"{name}.sim.onnx")
    for result in validate_component(comp, check, tolerance=tolerance):
        assert max(result.rel_l2.values()) > 1e-5  # the rounding is really there


def test_bf16_below_opset_22_keeps_conv_fp32(tiny_sd3_bundle, tmp_path):
    report = convert_precision(tiny_sd3_bundle / "onnx" / "vae_decoder.onnx", tmp_path / "vae.onnx", "bf16", None)
    assert report.kept_fp32["/decoder/conv_in/Conv"] == "unsupported"
    onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "vae.onnx")), check_type=True, strict_mode=True)
    report = convert_precision(tiny_sd3_bundle / "onnx" / "vae_decoder.onnx", tmp_path / "vae.onnx", "bf16", None, opset=22)
    assert "/decoder/conv_in/Conv" not in report.kept_fp32
    assert {o.version for o in onnx.load(str(tmp_path / "vae.onnx")).opset_import} == {22}


def test_report_round_trips_through_json(tiny_sd3_bundle, tmp_path):
    report = convert_precision(tiny_sd3_bundle / "onnx" / "text_encoder.onnx", tmp_path / "te.onnx", "fp16", None)
    assert report.reasons == {"normalisation": 7, "softmax": 3}
    assert report.kept_fp32["/model/text_model/final_layer_norm/LayerNormalization"] == "normalisation"
    assert PrecisionReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_bad_arguments(tiny_sd3_bundle, tmp_path):
    source = tiny_sd3_bundle / "onnx" / "text_encoder.onnx"
    with pytest.raises(InputError, match="precision must be 'fp16' or 'bf16', got 'int8'"):
        convert_precision(source, tmp_path / "x.onnx", "int8", None)
    with pytest.raises(InputError, match="must differ from model_path"):
        convert_precision(source, source, "fp16", None)
    with pytest.raises(InputError, match="could not run feed 0 with shapes"):
        record_ranges(source, [{"input_ids": np.full((1, 77), 10**6, dtype=np.int64)}])
    assert sorted(p.name for p in source.parent.iterdir() if p.name.startswith(".")) == []  # scratch copy removed

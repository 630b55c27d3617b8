"""Q/DQ placement in the quantized tiny-sd3 denoiser: TensorRT's explicit-quantization rules."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from latentrt.calibration.qdq import quantize_weight, weight_scales
from latentrt.bundle.manifest import load_manifest

LAYER_OPS = ("MatMul", "Gemm", "Conv")


def _graph(bundle):
    model = onnx.load(str(bundle / "onnx" / "transformer.onnx"))
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in model.graph.initializer}
    return model, producer, consumers, inits


def _op(producer, name):
    return producer[name].op_type if name in producer else None


@pytest.mark.parametrize("which", ["int8_bundle", "fp8_bundle"])
def test_qdq_only_on_layer_inputs_and_attention_stays_high_precision(which, request):
    bundle = request.getfixturevalue(which)
    model, producer, consumers, inits = _graph(bundle)
    nodes = model.graph.node
    for q in (n for n in nodes if n.op_type == "QuantizeLinear"):
        assert {c.op_type for c in consumers[q.output[0]]} == {"DequantizeLinear"}
        assert _op(producer, q.input[0]) not in LAYER_OPS, f"Q/DQ on the output of a layer: {q.name}"
    for dq in (n for n in nodes if n.op_type == "DequantizeLinear"):
        assert {c.op_type for c in consumers[dq.output[0]]} <= set(LAYER_OPS)
    for mm in (n for n in nodes if n.op_type == "MatMul"):
        from_dq = [_op(producer, i) == "DequantizeLinear" for i in mm.input]
        both_activations = not any(i in inits or _op(producer, i) in ("Constant", "DequantizeLinear") for i in mm.input)
        if both_activations:  # attention Q.K^T and softmax.V
            assert not any(from_dq), mm.name
    for sm in (n for n in nodes if n.op_type == "Softmax"):
        assert _op(producer, sm.input[0]) == "MatMul"
    record = load_manifest(bundle).extra["quantization"]["transformer"]
    weight_dqs = [n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert record["quantized_nodes"] == len(weight_dqs) == 13
    assert record["high_precision_attention_matmuls"] == 4


def test_weights_are_int8_per_output_channel_and_biases_stay_float(int8_bundle):
    model, producer, consumers, inits = _graph(int8_bundle)
    checked = {"MatMul": 0, "Gemm": 0}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or _op(producer, node.input[1]) != "DequantizeLinear":
            continue
        dq = producer[node.input[1]]
        weight = numpy_helper.to_array(inits[dq.input[0]])
        scale = numpy_helper.to_array(inits[dq.input[1]])
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        assert weight.dtype == np.int8 and weight.ndim == 2
        if node.op_type == "MatMul":  # [in, out]
            assert axis == 1 and scale.shape == (weight.shape[1],)
        else:  # Gemm transB=1: [out, in]
            assert next(a.i for a in node.attribute if a.name == "transB") == 1
            assert axis == 0 and scale.shape == (weight.shape[0],)
            assert inits[node.input[2]].data_type == onnx.TensorProto.FLOAT  # the bias is a float initializer
        assert np.abs(weight).max() == 127  # symmetric, each tensor uses the full range
        checked[node.op_type] += 1
    # 8 + 5 linears in the two blocks (Q/K/V exported as one MatMul per stream); the AdaLN Gemms
    # (one vector per sample) stay float
    assert checked == {"MatMul": 13, "Gemm": 0}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert gemms and all(inits[n.input[1]].data_type == onnx.TensorProto.FLOAT for n in gemms)
    for dq in (n for n in model.graph.node if n.op_type == "DequantizeLinear"):
        assert inits.get(dq.input[0]) is None or inits[dq.input[0]].data_type == onnx.TensorProto.INT8  # never int32 biases
        zero_point = numpy_helper.to_array(inits[dq.input[2]])
        assert zero_point.dtype == np.int8 and not zero_point.any()


def test_fp8_graph_is_opset_19_with_e4m3_weights(fp8_bundle):
    model, producer, consumers, inits = _graph(fp8_bundle)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 19
    assert load_manifest(fp8_bundle).components["transformer"].opset == 19
    types = {inits[n.input[0]].data_type for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    zero_points = {inits[n.input[2]].data_type for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert types == zero_points == {onnx.TensorProto.FLOAT8E4M3FN}


def test_excluded_layers_are_untouched(int8_bundle, tiny_sd3_bundle):
    quantized, producer, _, inits = _graph(int8_bundle)
    original, _, _, original_inits = _graph(tiny_sd3_bundle)
    excluded = load_manifest(int8_bundle).extra["quantization"]["transformer"]["excluded_layers"]
    assert {"/model/pos_embed/proj/Conv", "/model/proj_out/MatMul", "/model/context_embedder/MatMul", "/model/norm_out/linear/Gemm"} <= set(excluded)
    by_name = {n.name: n for n in quantized.graph.node}
    for old in (n for n in original.graph.node if n.name in excluded):
        new = by_name[old.name]
        assert list(new.input) == list(old.input)
        assert not any(_op(producer, i) == "DequantizeLinear" for i in new.input)
        np.testing.assert_array_equal(numpy_helper.to_array(inits[new.input[1]]), numpy_helper.to_array(original_inits[old.input[1]]))


def test_weight_scales_per_channel():
    w = np.array([[1.0, -2.0, 0.0], [0.5, 4.0, 0.0]], np.float32)  # MatMul layout [in=2, out=3]
    scales = weight_scales(w, 1, "int8")
    np.testing.assert_allclose(scales, [1.0 / 127, 4.0 / 127, 1.0])  # an all-zero channel gets scale 1
    q = quantize_weight(w, scales, 1, "int8")
    np.testing.assert_array_equal(q, [[127, -64, 0], [64, 127, 0]])  # 63.5 and -63.5 round half to even
    np.testing.assert_allclose(weight_scales(w, 0, "fp8"), [2.0 / 448, 4.0 / 448])
    assert quantize_weight(w, weight_scales(w, 0, "fp8"), 0, "fp8").dtype.name == "float8_e4m3fn"

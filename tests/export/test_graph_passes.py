"""The ONNX rewrites applied after tracing: same function, the structure ONNX Runtime and TensorRT want."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from latentrt.export.graph_passes import fuse_parallel_matmuls


def _ort(model: onnx.ModelProto, optimized=None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _projections(widths, *, bias=True, shared_weight=False) -> onnx.ModelProto:
    """x [b, t, 16] -> one MatMul (+ bias Add) per width, each output a graph output; plus an
    unrelated MatMul on another input that must be left alone."""
    rng = np.random.default_rng(0)
    nodes, inits, outputs = [], [], []
    for i, n in enumerate(widths):
        w = "w0" if shared_weight else f"w{i}"
        if not shared_weight or i == 0:
            inits.append(numpy_helper.from_array(rng.standard_normal((16, n)).astype(np.float32), w))
        out = f"y{i}"
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"b{i}"))
            nodes.append(helper.make_node("MatMul", ["x", w], [f"m{i}"]))
            nodes.append(helper.make_node("Add", [f"b{i}", f"m{i}"], [out]))  # bias first, as torch writes it
        else:
            nodes.append(helper.make_node("MatMul", ["x", w], [out]))
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["b", "t", n]))
    inits.append(numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w_other"))
    nodes.append(helper.make_node("MatMul", ["z", "w_other"], ["y_other"]))
    outputs.append(helper.make_tensor_value_info("y_other", TensorProto.FLOAT, ["b", "t", 8]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "t", 16]) for n in ("x", "z")]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("bias", [True, False])
def test_parallel_projections_become_one_matmul(bias):
    model = _projections([32, 32, 24], bias=bias)
    feeds = {n: np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32) for n in ("x", "z")}
    expected = _ort(model).run(None, feeds)

    assert fuse_parallel_matmuls(model) == 1
    onnx.checker.check_model(model)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops == ({"MatMul": 2, "Add": 1, "Split": 1} if bias else {"MatMul": 2, "Split": 1})
    fused = next(i for i in model.graph.initializer if i.name.endswith("fused_weight"))
    assert list(fused.dims) == [16, 88]
    assert not {"w0", "w1", "w2", "b0", "b1", "b2"} & {i.name for i in model.graph.initializer}
    for got, want in zip(_ort(model).run(None, feeds), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_shared_weights_and_single_matmuls_are_left_alone():
    model = _projections([32, 32], shared_weight=True)
    assert fuse_parallel_matmuls(model) == 0
    assert collections.Counter(n.op_type for n in model.graph.node)["MatMul"] == 3


def test_tiny_sd3_transformer_is_exported_fused_for_onnx_runtime(tiny_sd3_bundle, tmp_path):
    """Q/K/V are one MatMul per attention stream, and ONNX Runtime fuses the tanh GELU into FastGelu."""
    model = onnx.load(str(tiny_sd3_bundle / "onnx" / "transformer.onnx"))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    blocks = sum(1 for n in model.graph.node if n.op_type == "Split" and "/attn/" in n.name)
    assert blocks >= 2 and ops["Tanh"] >= 1 and ops["Pow"] == ops["Tanh"]

    _ort(model, optimized=tmp_path / "optimized.onnx")
    optimized = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert optimized["FastGelu"] == ops["Tanh"] and optimized["Tanh"] == 0

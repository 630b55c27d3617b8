"""The ONNX rewrites applied after tracing: same function, the structure ONNX Runtime and TensorRT want."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from latentrt.export.graph_passes import fold_static_shapes, fuse_parallel_matmuls, split_sequences


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


def _chunk_and_reshape(width) -> onnx.ModelProto:
    """x [b, width] -> y = x.chunk(3, dim=1)[1] and z = x.reshape(b, -1, 2), sizes read from Shape as
    the TorchScript exporter writes them."""
    const = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["w"], axis=0),
        helper.make_node("Div", ["w", "three"], ["c"]),
        helper.make_node("Mul", ["c", "two"], ["c2"]),
        helper.make_node("Unsqueeze", ["c", "zero_axis"], ["start"]),
        helper.make_node("Unsqueeze", ["c2", "zero_axis"], ["end"]),
        helper.make_node("Slice", ["x", "start", "end", "one_axis"], ["y"]),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "zero_axis"], ["b1"]),
        helper.make_node("Concat", ["b1", "minus_one", "two_1d"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["z"]),
    ]
    inits = [const("zero", 0), const("one", 1), const("two", 2), const("three", 3), const("zero_axis", [0]),
             const("one_axis", [1]), const("minus_one", [-1]), const("two_1d", [2])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "c"]), helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", "w", 2])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_arithmetic_on_static_dims_becomes_constants():
    model = _chunk_and_reshape(12)
    feeds = [{"x": np.random.default_rng(b).standard_normal((b, 12)).astype(np.float32)} for b in (1, 5)]
    expected = [_ort(model).run(None, f) for f in feeds]

    assert fold_static_shapes(model) == 5  # the width's Gather, Div, Mul and both Unsqueezes
    onnx.checker.check_model(model)
    # The batch is dynamic: its Shape -> Gather -> Unsqueeze -> Concat stays; the Slice reads constants.
    assert [n.op_type for n in model.graph.node] == ["Shape", "Slice", "Gather", "Unsqueeze", "Concat", "Reshape"]
    constants = {t.name: numpy_helper.to_array(t).tolist() for t in model.graph.initializer}
    slice_node = next(n for n in model.graph.node if n.op_type == "Slice")
    assert [constants[i] for i in slice_node.input[1:3]] == [[4], [8]]
    for f, want in zip(feeds, expected):
        for got, ref in zip(_ort(model).run(None, f), want):
            np.testing.assert_array_equal(got, ref)


def test_dynamic_dims_are_not_folded():
    model = _chunk_and_reshape("width")
    before = [n.op_type for n in model.graph.node]
    assert fold_static_shapes(model) == 0
    assert [n.op_type for n in model.graph.node] == before


def test_tiny_sd3_sizes_are_constants_in_the_bundle(tiny_sd3_bundle):
    """The attention scale and the AdaLN chunk bounds are static in SD3: none is computed at run time."""
    model = onnx.load(str(tiny_sd3_bundle / "onnx" / "transformer.onnx"))
    constants = {t.name for t in model.graph.initializer} | {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["Sqrt"] == 0
    chunks = [n for n in model.graph.node if n.op_type == "Slice" and "/norm1/" in n.name]
    assert len(chunks) >= 6 and all(n.input[1] in constants and n.input[2] in constants for n in chunks)


@pytest.mark.parametrize("split", [np.array(3, np.int64), np.array([2, 5], np.int64), None])
def test_sequence_splits_become_split(split):
    """`SplitToSequence` + `SequenceAt` (dynamo without its optimizer) -> one `Split`, same values: a
    chunk size (7 = 3 + 3 + 1), explicit sizes, and sizes computed at run time from a shape."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 7])
    nodes, inits = [], []
    if split is None:  # sizes [n - 5, 5] from the input's shape
        inits += [numpy_helper.from_array(np.array([1], np.int64), "one"), numpy_helper.from_array(np.array([5], np.int64), "five")]
        nodes += [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Gather", ["shape", "one"], ["width"]),
            helper.make_node("Sub", ["width", "five"], ["rest"]),
            helper.make_node("Concat", ["rest", "five"], ["sizes"], axis=0),
        ]
    else:
        inits.append(numpy_helper.from_array(split, "sizes"))
    nodes.append(helper.make_node("SplitToSequence", ["x", "sizes"], ["seq"], axis=1))
    picks = [0, -1] if split is None or split.ndim else [0, 1, -1]
    outputs = []
    for k, position in enumerate(picks):
        inits.append(numpy_helper.from_array(np.array(position, np.int64), f"at{k}"))
        nodes.append(helper.make_node("SequenceAt", ["seq", f"at{k}"], [f"y{k}"]))
        outputs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, None))
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outputs, inits), opset_imports=[helper.make_opsetid("", 18)])
    feeds = {"x": np.arange(14, dtype=np.float32).reshape(2, 7)}
    expected = _ort(model).run(None, feeds)

    assert split_sequences(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert "SplitToSequence" not in ops and "SequenceAt" not in ops and ops.count("Split") == 1
    for got, want in zip(_ort(model).run(None, feeds), expected):
        np.testing.assert_array_equal(got, want)

"""The rewrites into ONNX Runtime's fused kernels done at load time: attention, int8 linear layers,
AdaLN modulations."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from latentrt.runtime.backends.onnxruntime.fusions import fuse_attention, fuse_int8_matmuls, fuse_modulations, rewritten_for_onnx_runtime


def _run(model_or_path, feeds):
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)


def _transformer_feeds(batch=2, size=8, context=77 + 16, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "hidden_states": rng.standard_normal((batch, 16, size, size), dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, context, 96), dtype=np.float32),
        "pooled_projections": rng.standard_normal((batch, 80), dtype=np.float32),
        "timestep": np.array([700.0, 20.0][:batch], np.float32),
    }


def test_sd3_joint_attention_becomes_one_kernel(tiny_sd3_bundle):
    path = tiny_sd3_bundle / "onnx" / "transformer.onnx"
    model = onnx.load(str(path))
    softmaxes = sum(n.op_type == "Softmax" for n in model.graph.node)

    assert fuse_attention(model) == softmaxes == 2  # one joint attention per block
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["MultiHeadAttention"] == 2 and ops["Softmax"] == 0 and ops["Sqrt"] == 0
    for feeds in (_transformer_feeds(), _transformer_feeds(batch=1, size=12, context=77 + 40, seed=1)):
        np.testing.assert_allclose(_run(model, feeds)[0], _run(path, feeds)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_3", "vae_decoder"])
def test_other_attention_is_left_alone(tiny_sd3_bundle, component):
    """CLIP's causal mask and T5's position bias are not PyTorch's unmasked SDPA; the VAE's attention
    is written in another form: none of them matches, and the graph stays as it was."""
    model = onnx.load(str(tiny_sd3_bundle / "onnx" / f"{component}.onnx"))
    before = [n.op_type for n in model.graph.node]
    assert fuse_attention(model) == 0
    assert [n.op_type for n in model.graph.node] == before


def test_fused_copy_is_written_with_external_weights(tiny_sd3_bundle, tmp_path):
    path = rewritten_for_onnx_runtime(tiny_sd3_bundle / "onnx" / "transformer.onnx", tmp_path)
    assert path is not None and path.parent == tmp_path and (tmp_path / (path.name + ".data")).is_file()
    feeds = _transformer_feeds()
    reference = _run(tiny_sd3_bundle / "onnx" / "transformer.onnx", feeds)[0]
    np.testing.assert_allclose(_run(path, feeds)[0], reference, rtol=1e-4, atol=1e-5)
    assert rewritten_for_onnx_runtime(tiny_sd3_bundle / "onnx" / "vae_decoder.onnx", tmp_path) is None


def test_int8_linears_become_one_kernel_with_their_bias(int8_bundle, tiny_sd3_bundle):
    path = int8_bundle / "onnx" / "transformer.onnx"
    model = onnx.load(str(path))
    producer = {o: n for n in model.graph.node for o in n.output}
    quantized = [n for n in model.graph.node if n.op_type == "MatMul" and getattr(producer.get(n.input[1]), "op_type", None) == "DequantizeLinear"]
    adds = sum(n.op_type == "Add" for n in model.graph.node)

    assert fuse_int8_matmuls(model) == len(quantized) == 13
    onnx.checker.check_model(model)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    fused = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    with_bias = sum(len(n.input) == 7 for n in fused)
    assert len(fused) == 13 and ops["DequantizeLinear"] == 0 and ops["QuantizeLinear"] == 13
    assert with_bias >= 8 and ops["Add"] == adds - with_bias
    for feeds in (_transformer_feeds(), _transformer_feeds(batch=1, size=12, context=77 + 40, seed=1)):
        np.testing.assert_allclose(_run(model, feeds)[0], _run(path, feeds)[0], rtol=1e-6, atol=1e-6)
    assert fuse_int8_matmuls(onnx.load(str(tiny_sd3_bundle / "onnx" / "transformer.onnx"))) == 0


def test_int8_linears_with_unsigned_weights_are_exact(int8_bundle):
    """For CPUs whose u8 x s8 GEMM saturates: uint8 weights (int8 + 128, zero point 128) send ONNX Runtime
    to its u8 x u8 kernel, which widens before multiplying. The integers are the same, so the layers give
    the Q/DQ graph's values on any CPU (and on one without VNNI, the u8 x s8 kernel does not)."""
    from latentrt.runtime.backends.cpu import cpu_info
    from onnx import numpy_helper

    path = int8_bundle / "onnx" / "transformer.onnx"
    model = onnx.load(str(path))
    assert fuse_int8_matmuls(model, unsigned_weights=True) == 13
    onnx.checker.check_model(model)
    inits = {i.name: i for i in model.graph.initializer}
    fused = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    for node in fused:
        weight, zero = numpy_helper.to_array(inits[node.input[1]]), numpy_helper.to_array(inits[node.input[5]])
        assert weight.dtype == np.uint8 and zero.dtype == np.uint8 and np.all(zero == 128)
        assert zero.shape == numpy_helper.to_array(inits[node.input[3]]).shape  # one zero point per scale
    feeds = _transformer_feeds()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")  # the reference: the Q/DQ graph in float
    expected = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    actual = _run(model, feeds)[0]
    assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 1e-4
    if not cpu_info().int8_dot:
        signed = onnx.load(str(path))
        fuse_int8_matmuls(signed)
        saturated = _run(signed, feeds)[0]
        assert np.linalg.norm(saturated - expected) / np.linalg.norm(expected) > 1e-3


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, as the bundles use it
def test_attention_with_the_scale_computed_at_run_time(tmp_path):
    """Bundles exported before sizes were folded compute 1/sqrt(D) from the query's shape: matched too.
    The module is SD3's joint attention in small: image and text heads concatenated along the tokens."""
    import torch

    class JointAttention(torch.nn.Module):
        def forward(self, x, c):  # [b, s, 2 heads x 8], [b, t, 16]
            heads = lambda t: t.view(t.shape[0], -1, 2, 8).transpose(1, 2)  # noqa: E731
            q, k, v = (torch.cat([heads(x * w), heads(c * w)], dim=2) for w in (1.0, 0.5, -2.0))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return out.transpose(1, 2).reshape(x.shape[0], -1, 16)

    path = tmp_path / "attention.onnx"
    axes = {"x": {0: "b", 1: "s"}, "c": {0: "b", 1: "t"}, "out": {0: "b", 1: "st"}}
    torch.onnx.export(
        JointAttention(), (torch.randn(2, 5, 16), torch.randn(2, 3, 16)), str(path), input_names=["x", "c"],
        output_names=["out"], dynamic_axes=axes, dynamo=False, opset_version=18,
    )
    model = onnx.load(str(path))
    assert any(n.op_type == "Sqrt" for n in model.graph.node)

    assert fuse_attention(model) == 1
    assert collections.Counter(n.op_type for n in model.graph.node)["MultiHeadAttention"] == 1
    assert not any(n.op_type in ("Sqrt", "Softmax") for n in model.graph.node)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((3, 7, 16), dtype=np.float32), "c": rng.standard_normal((3, 4, 16), dtype=np.float32)}
    np.testing.assert_allclose(_run(model, feeds)[0], _run(path, feeds)[0], rtol=1e-5, atol=1e-6)


def _chunked_gemms(model) -> int:
    """Gemms whose output only Slices read: the AdaLN modulations."""
    readers = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            readers[i].append(n.op_type)
    return sum(n.op_type == "Gemm" and set(readers[n.output[0]]) == {"Slice"} for n in model.graph.node)


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_adaln_modulations_are_unsqueezed_once(tiny_sd3_bundle, int8_bundle, which):
    """Each AdaLN Gemm's chunks come out of one Split already broadcast; the `1 + scale` Adds (and in
    the int8 graph SmoothQuant's `Mul 1/s` on the shifts) are folded into the Gemm."""
    path = (tiny_sd3_bundle if which == "fp32" else int8_bundle) / "onnx" / "transformer.onnx"
    model = onnx.load(str(path))
    before = collections.Counter(n.op_type for n in model.graph.node)
    gemms = _chunked_gemms(model)

    assert fuse_modulations(model) == gemms == 5  # norm1 and norm1_context of 2 blocks, norm_out
    onnx.checker.check_model(model)
    after = collections.Counter(n.op_type for n in model.graph.node)
    # chunks: 6 per AdaLN-Zero (3: both norms of block 0, the image norm of block 1), 2 per continuous
    # AdaLN (block 1's context norm, norm_out); one Unsqueeze per Gemm instead of one per chunk
    assert after["Slice"] == before["Slice"] - 22 and after["Unsqueeze"] == before["Unsqueeze"] - 22 + 5
    assert after["Add"] == before["Add"] - 8  # 1 + scale_msa and 1 + scale_mlp per AdaLN-Zero, 1 + scale per continuous
    if which == "int8":
        assert after["Mul"] < before["Mul"]
    for feeds in (_transformer_feeds(), _transformer_feeds(batch=1, size=12, context=77 + 40, seed=1)):
        np.testing.assert_allclose(_run(model, feeds)[0], _run(path, feeds)[0], rtol=1e-5, atol=1e-5)


def _modulation_graph(trans_b: bool, read_flat: bool):
    """x [b, 4] -> Gemm -> three chunks of 3 -> (1 + c0)[:, None], (c1 * v)[:, None] + 2, c2[:, None]:
    the shapes of an AdaLN with constants folded on the way; with `read_flat` the last chunk is also
    read without its Unsqueeze."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((9, 4) if trans_b else (4, 9)).astype(np.float32)
    consts = {
        "w": w, "b": rng.standard_normal(9).astype(np.float32), "one": np.array(1.0, np.float32),
        "v": rng.standard_normal(3).astype(np.float32), "two": np.array([[2.0]], np.float32), "axis": np.array([1], np.int64),
        **{f"s{i}": np.array([3 * i]) for i in range(3)}, **{f"e{i}": np.array([3 * i + 3]) for i in range(3)},
        "ax1": np.array([1]),
    }
    node = helper.make_node
    nodes = [node("Gemm", ["x", "w", "b"], ["y"], transB=int(trans_b))]
    nodes += [node("Slice", ["y", f"s{i}", f"e{i}", "ax1"], [f"c{i}"]) for i in range(3)]
    nodes += [
        node("Add", ["one", "c0"], ["c0p"]), node("Unsqueeze", ["c0p", "axis"], ["out0"]),
        node("Mul", ["c1", "v"], ["c1v"]), node("Unsqueeze", ["c1v", "axis"], ["c1u"]), node("Add", ["c1u", "two"], ["out1"]),
        node("Unsqueeze", ["c2", "axis"], ["out2"]),
    ]
    outputs = ["out0", "out1", "out2"] + (["c2"] if read_flat else [])
    graph = helper.make_graph(
        nodes, "adaln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(v, np.int64 if v.dtype.kind == "i" else np.float32), k) for k, v in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("trans_b", [False, True])
def test_constants_on_the_chunks_fold_into_the_gemm(trans_b):
    model = _modulation_graph(trans_b, read_flat=False)
    reference = onnx.ModelProto.FromString(model.SerializeToString())

    assert fuse_modulations(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Unsqueeze", "Split"]
    feeds = {"x": np.random.default_rng(1).standard_normal((5, 4), dtype=np.float32)}
    for got, want in zip(_run(model, feeds), _run(reference, feeds)):
        assert got.shape == want.shape == (5, 1, 3)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_chunk_read_without_broadcast_keeps_the_graph():
    model = _modulation_graph(trans_b=False, read_flat=True)
    before = [n.op_type for n in model.graph.node]
    assert fuse_modulations(model) == 0
    assert [n.op_type for n in model.graph.node] == before


def _split_graph(*, subgraph_read=False, initializers_as_inputs=False, dtype=np.float32, scale=3.0):
    """x [b, 4] -> Gemm -> Split [6, 3] -> the 6 cut by Slices [-6:-3] and [3:huge], each unsqueezed, the
    last chunk multiplied by `scale` and unsqueezed. Optionally an If branch also reads the first chunk,
    or every initializer is also declared as a graph input (overridable, so not a constant)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    consts = {
        "w": rng.standard_normal((4, 9)).astype(dtype), "b": rng.standard_normal(9).astype(dtype), "sizes": np.array([6, 3]),
        "lo": np.array([-6]), "mid": np.array([-3]), "three": np.array([3]), "huge": np.array([2**62]), "ax1": np.array([1]),
        "k": np.array(scale, dtype),
    }
    node = helper.make_node
    nodes = [
        node("Gemm", ["x", "w", "b"], ["y"]), node("Split", ["y", "sizes"], ["s0", "s1"], axis=1),
        node("Slice", ["s0", "lo", "mid", "ax1"], ["c0"]), node("Slice", ["s0", "three", "huge", "ax1"], ["c1"]),
        node("Mul", ["s1", "k"], ["c2"]),
    ] + [node("Unsqueeze", [f"c{i}", "ax1"], [f"out{i}"]) for i in range(3)]
    outputs = [helper.make_tensor_value_info(f"out{i}", elem, None) for i in range(3)]
    if subgraph_read:
        branch = helper.make_graph([node("Identity", ["c0"], ["seen"])], "then", [], [helper.make_tensor_value_info("seen", elem, None)])
        nodes.append(node("If", ["flag"], ["picked"], then_branch=branch, else_branch=branch))
        outputs.append(helper.make_tensor_value_info("picked", elem, None))
    initializers = [numpy_helper.from_array(np.asarray(v, np.int64 if v.dtype.kind == "i" else dtype), n) for n, v in consts.items()]
    inputs = [helper.make_tensor_value_info("x", elem, ["b", 4])]
    if subgraph_read:
        initializers.append(numpy_helper.from_array(np.array(True), "flag"))
    if initializers_as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in initializers]
    graph = helper.make_graph(nodes, "split", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_chunks_cut_by_a_split_and_negative_slices():
    model = _split_graph()
    reference = onnx.ModelProto.FromString(model.SerializeToString())
    assert fuse_modulations(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Unsqueeze", "Split"]
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 4), dtype=np.float32)}
    for got, want in zip(_run(model, feeds), _run(reference, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "case", [dict(subgraph_read=True), dict(initializers_as_inputs=True), dict(dtype=np.float16, scale=6e4)],
    ids=["read-in-a-subgraph", "initializers-are-inputs", "float16-overflow"],
)
def test_what_the_fold_cannot_keep_leaves_the_graph(case):
    """A chunk also read inside an If branch; weights a caller may override; a Mul that folded into a
    float16 weight would overflow it."""
    model = _split_graph(**case)
    before = [n.op_type for n in model.graph.node]
    assert fuse_modulations(model) == 0
    assert [n.op_type for n in model.graph.node] == before


def test_flux_modulations_split_by_num_outputs(preset_bundle):
    """The dynamo exporter (Flux) writes `emb.chunk(6, dim=1)` as an opset-18 Split with num_outputs."""
    path = preset_bundle("tiny-flux") / "onnx" / "transformer.onnx"
    model = onnx.load(str(path))
    assert any(n.op_type == "Split" and any(a.name == "num_outputs" for a in n.attribute) for n in model.graph.node)
    unsqueezes = sum(n.op_type == "Unsqueeze" for n in model.graph.node)

    assert fuse_modulations(model) == 5  # norm1 and norm1_context of the double block, the norm of each of 2 single blocks, norm_out
    assert sum(n.op_type == "Unsqueeze" for n in model.graph.node) < unsqueezes
    rng = np.random.default_rng(0)
    for batch, image, text in ((2, 16, 8), (1, 36, 5)):
        feeds = {
            "hidden_states": rng.standard_normal((batch, image, 64), dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, text, 48), dtype=np.float32),
            "pooled_projections": rng.standard_normal((batch, 32), dtype=np.float32),
            "timestep": rng.random(batch, dtype=np.float32),
            "img_ids": rng.random((image, 3), dtype=np.float32) * 4,
            "txt_ids": np.zeros((text, 3), np.float32),
            "guidance": np.full(batch, 3.5, np.float32),
        }
        np.testing.assert_allclose(_run(model, feeds)[0], _run(path, feeds)[0], rtol=1e-5, atol=1e-5)

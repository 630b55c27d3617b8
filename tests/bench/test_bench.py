"""latentrt bench: the report's numbers are consistent and the FLOP count is exact on known graphs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from latentrt.bench import BenchConfig, BenchReport, run_bench
from latentrt.bench.flops import onnx_flops
from latentrt.errors import InputError


def test_flops_of_matmul_and_conv(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((64, 32), np.float32), "w")
    k = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "k")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Conv", ["img", "k"], ["z"], pads=[1, 1, 1, 1])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n", 64]), helper.make_tensor_value_info("img", TensorProto.FLOAT, ["b", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [w, k],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    flops = onnx_flops(path, {"x": [2, 10, 64], "img": [2, 3, 16, 16]})
    assert flops == 2 * (2 * 10 * 32) * 64 + 2 * (2 * 8 * 16 * 16) * (3 * 3 * 3)


def test_flops_of_attention_with_shapes_computed_at_run_time(tmp_path):
    """Heads split by a Reshape whose target is read from Shape, as the exporter writes attention:
    ONNX shape inference alone leaves the scores' shape unknown; the count must still be exact."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    const = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axis0"], ["b1"]),
        helper.make_node("Gather", ["s", "two"], ["width"], axis=0),
        helper.make_node("Div", ["width", "heads"], ["d"]),
        helper.make_node("Unsqueeze", ["d", "axis0"], ["d1"]),
        helper.make_node("Concat", ["b1", "minus_one", "heads_1d", "d1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["r"]),
        helper.make_node("Transpose", ["r"], ["q"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["r"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
    ]
    inits = [const("zero", 0), const("two", 2), const("axis0", [0]), const("heads", 2), const("minus_one", [-1]), const("heads_1d", [2])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n", 64])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)], inits,
    )
    path = tmp_path / "attention.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    # [3, 2 heads, 10, 32] x [3, 2, 32, 10]
    assert onnx_flops(path, {"x": [3, 10, 64]}) == 2 * (3 * 2 * 10 * 10) * 32


def test_config_errors():
    with pytest.raises(InputError, match="unknown backend"):
        BenchConfig(source="tiny-sd3", backends=("torch", "jax"))
    with pytest.raises(InputError, match="needs --int8-bundle"):
        BenchConfig(source="tiny-sd3", backends=("onnxruntime-int8",))


def test_torch_vs_onnxruntime_report(tiny_sd3_dir, tiny_sd3_bundle):
    config = BenchConfig(source=str(tiny_sd3_dir), bundle=str(tiny_sd3_bundle), steps=2, runs=2, warmup=0, height=64, width=64)
    report = run_bench(config)
    assert set(report.backends) == {"torch", "onnxruntime"}
    torch_r, ort_r = report.backends["torch"], report.backends["onnxruntime"]
    assert torch_r.speedup_vs_torch == 1.0 and torch_r.max_abs_diff_vs_torch == 0.0
    assert ort_r.speedup_vs_torch == pytest.approx(torch_r.end_to_end_median_s / ort_r.end_to_end_median_s)
    assert ort_r.max_abs_diff_vs_torch <= 2e-3  # same latents, same image
    for r in (torch_r, ort_r):
        e2e = r.stages["end_to_end"]
        assert 0 < e2e["min"] <= e2e["median"] <= e2e["max"] and r.peak_rss_mb > 10
        assert 0 < r.floor_fraction["denoising_step"] <= 1
    assert report.flops["end_to_end"] == pytest.approx(
        report.flops["text_encoding"] + 2 * report.flops["denoising_step"] + report.flops["vae_decode"]
    )
    assert ort_r.peak_rss_mb < torch_r.peak_rss_mb  # the torch-free runtime process is smaller
    again = BenchReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again.to_markdown() == report.to_markdown()
    assert "| onnxruntime |" in report.to_markdown()

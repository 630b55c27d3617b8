"""latentrt bench: the report's numbers are consistent and the FLOP count is exact on known graphs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from latentrt.bench import BenchConfig, BenchReport, run_bench, runner
from latentrt.bench.flops import onnx_flops
from latentrt.calibration.quality import MAX_PSNR_DB
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
    for backend in ("onnxruntime-int8", "openvino-int8"):
        with pytest.raises(InputError, match=f"the {backend} backend needs --int8-bundle"):
            BenchConfig(source="tiny-sd3", backends=(backend,))
    with pytest.raises(InputError, match="name one twice"):
        BenchConfig(source="tiny-sd3", backends=("torch", "torch"))


@pytest.mark.parametrize(
    "flags,expected",
    [
        ({"avx2", "fma"}, ("torch", "onnxruntime", "openvino")),  # AMD EPYC Milan: no bf16 baseline
        ({"avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"}, ("torch", "torch-bf16", "onnxruntime", "openvino")),
    ],
)
def test_default_backends_follow_the_cpu(monkeypatch, flags, expected):
    """The baselines a user of this machine would pick: diffusers in bf16 where the CPU has bf16 units."""
    from latentrt.runtime.backends.cpu import CpuInfo

    monkeypatch.setattr(runner, "cpu_info", lambda: CpuInfo("cpu", "x86_64", frozenset(flags)))
    assert BenchConfig(source="tiny-sd3").backends == expected
    assert BenchConfig(source="tiny-sd3", int8_bundle="q").backends == expected + ("onnxruntime-int8", "openvino-int8")
    assert BenchConfig(source="tiny-sd3", backends=("torch",)).backends == ("torch",)


def test_torch_vs_onnxruntime_report(tiny_sd3_dir, tiny_sd3_bundle):
    config = BenchConfig(
        source=str(tiny_sd3_dir), bundle=str(tiny_sd3_bundle), backends=("torch", "onnxruntime"), steps=2, runs=2, warmup=0, height=64, width=64
    )
    report = run_bench(config)
    assert set(report.backends) == {"torch", "onnxruntime"}
    torch_r, ort_r = report.backends["torch"], report.backends["onnxruntime"]
    assert torch_r.speedup_vs_torch == 1.0 and torch_r.max_abs_diff_vs_torch == 0.0
    assert ort_r.speedup_vs_torch == pytest.approx(torch_r.end_to_end_median_s / ort_r.end_to_end_median_s)
    assert ort_r.speedup_vs_fastest_torch == ort_r.speedup_vs_torch and report.machine["fastest_torch"] == "torch"
    assert ort_r.max_abs_diff_vs_torch <= 2e-3  # same latents, same image
    assert torch_r.psnr_db_vs_torch == MAX_PSNR_DB and ort_r.psnr_db_vs_torch > 50
    rates = report.machine["matrix_gflops"]
    assert set(rates["float32"]) >= {"numpy", "onnxruntime"} and set(rates["int8"]) >= {"onnxruntime u8s8", "onnxruntime u8u8"}
    for r in (torch_r, ort_r):
        e2e = r.stages["end_to_end"]
        assert 0 < e2e["min"] <= e2e["median"] <= e2e["max"] and r.peak_rss_mb > 10
        assert 0 < r.floor_fraction["denoising_step"] <= 1
        assert r.floor_gflops == pytest.approx(max(rates["float32"].values()))  # float32 backends: the float32 rate
    assert report.flops["end_to_end"] == pytest.approx(
        report.flops["text_encoding"] + 2 * report.flops["denoising_step"] + report.flops["vae_decode"]
    )
    assert ort_r.peak_rss_mb < torch_r.peak_rss_mb  # the torch-free runtime process is smaller
    again = BenchReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again.to_markdown() == report.to_markdown()
    markdown = report.to_markdown()
    assert "| onnxruntime |" in markdown
    from latentrt.runtime.backends.cpu import cpu_info

    assert f"CPU: {cpu_info().description}" in markdown and f"matrix ISA: {cpu_info().matrix_isa}" in markdown


def test_bf16_baseline_and_int8_backends(tiny_sd3_dir, tiny_sd3_bundle, int8_bundle, tmp_path):
    """torch-bf16 is diffusers with bf16 weights (same latents, bf16 rounding); int8 backends' floors use the
    fastest rate of any precision they may run, so no fraction of the floor exceeds 1."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    # Copies: OpenVINO caches its compiled models in the bundle, and other tests check the shared bundles' files.
    bundle, int8 = shutil.copytree(tiny_sd3_bundle, tmp_path / "fp32"), shutil.copytree(int8_bundle, tmp_path / "int8")
    backends = ("torch", "torch-bf16", "openvino", "onnxruntime-int8", "openvino-int8")
    config = BenchConfig(
        source=str(tiny_sd3_dir), bundle=str(bundle), int8_bundle=str(int8), backends=backends,
        steps=2, runs=1, warmup=0, height=64, width=64,
    )
    report = run_bench(config)
    r = report.backends
    assert list(r) == list(backends)
    fastest = min(("torch", "torch-bf16"), key=lambda b: r[b].end_to_end_median_s)
    assert report.machine["fastest_torch"] == fastest
    for result in r.values():
        assert result.speedup_vs_fastest_torch == pytest.approx(r[fastest].end_to_end_median_s / result.end_to_end_median_s)
        assert 0 < result.floor_fraction["denoising_step"] <= 1
    assert 1e-3 < r["torch-bf16"].max_abs_diff_vs_torch < 0.5  # bf16's 8-bit mantissa, same image
    assert 15 < r["torch-bf16"].psnr_db_vs_torch < r["openvino"].psnr_db_vs_torch
    assert r["openvino"].max_abs_diff_vs_torch <= 2e-3
    assert r["openvino-int8"].max_abs_diff_vs_torch < 0.5 and r["onnxruntime-int8"].max_abs_diff_vs_torch < 0.5
    rates = report.machine["matrix_gflops"]
    best_any = max(v for p in ("float32", "bfloat16", "int8") for v in rates.get(p, {}).values())
    assert r["openvino-int8"].floor_gflops == pytest.approx(best_any)
    assert r["torch"].floor_gflops == pytest.approx(max(rates["float32"].values()))
    if not report.machine["bf16"]:
        assert "PyTorch emulates bf16 here" in report.to_markdown()
    best = min(("openvino", "onnxruntime-int8", "openvino-int8"), key=lambda b: r[b].end_to_end_median_s)
    assert f"Fastest latentrt backend: {best}, {r[best].speedup_vs_fastest_torch:.2f}x over the fastest torch configuration ({fastest})" in report.to_markdown()

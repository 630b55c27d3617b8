"""The report's suggestions, schema and plot, from hand-made layer lists (no model)."""

from __future__ import annotations

import json
import re

import pytest

from latentrt.debug.report import DebugReport, LayerReport, Suggestion, exclude_pattern, first, suggest


def _layer(name, rel, *, q=False, inf=0, ref=1.0):
    return LayerReport(name=name, op="MatMul" if q else "Add", max_abs=None if inf else rel, rel_l2=None if inf else rel,
                       nan=0, inf=inf, min=-1.0, max=1.0, reference_absmax=ref, quantized=q)


def _suggest(layers, precision, tolerance, sources):
    return suggest(layers, precision=precision, tolerance=tolerance, sources=sources,
                   first_over=first(layers, lambda l: l.over(tolerance)), first_nonfinite=first(layers, lambda l: l.nonfinite))


def test_int8_blames_the_layer_that_adds_error_not_the_first_downstream():
    layers = [_layer("a", 0.01, q=True), _layer("b", 0.012), _layer("c", 0.5, q=True), _layer("d", 0.6, q=True), _layer("e", 0.55)]
    sources = {"b": ["a"], "c": ["b"], "d": ["c"], "e": ["d"]}
    s = _suggest(layers, "int8", 0.1, sources)
    assert s.exclude == ("^c$",)  # d is over tolerance too, but adds only 0.6 / 0.5
    assert "--exclude '^c$'" in s.command and s.command.startswith("latentrt calibrate FP32_BUNDLE")


def test_fp16_keeps_what_passes_the_island_margin_and_where_inf_starts():
    layers = [_layer("a", 1e-3, ref=10.0), _layer("mm", 0, inf=5, ref=2e5), _layer("add", 0, inf=5, ref=2e5), _layer("norm", 0, inf=3, ref=1.0)]
    s = _suggest(layers, "fp16", 1e-2, {"mm": ["a"], "add": ["mm"], "norm": ["add"]})
    assert s.keep_fp32 == ("mm", "add")
    assert "'mm' is the first layer to produce NaN/Inf in fp16" in s.text and "2e+05" in s.text


def test_clean_report_suggests_nothing():
    layers = [_layer("a", 1e-4), _layer("b", 2e-3)]
    s = _suggest(layers, "fp16", 1e-2, {})
    assert s == Suggestion(text=s.text) and "nothing to change" in s.text


def test_exclude_pattern_matches_only_its_node():
    pattern = exclude_pattern("/model/transformer_blocks.1/attn/to_out.0/MatMul")
    assert re.search(pattern, "/model/transformer_blocks.1/attn/to_out.0/MatMul")
    assert not re.search(pattern, "/model/transformer_blocks.11/attn/to_out.0/MatMul")
    assert not re.search(pattern, "/model/transformer_blocks.1/attn/to_out.0/MatMul/fused")


def test_json_schema_is_stable():
    layers = (_layer("a", 0.2, q=True), _layer("b", 0, inf=2))
    report = DebugReport(component="transformer", reference="ref", candidate="cand", backend="onnxruntime", precision="int8",
                         tolerance=0.1, calls=3, layers=layers, first_over_tolerance="a", first_nonfinite="b",
                         suggestion=Suggestion(text="t", exclude=("^a$",), command="c"), not_compared={"x": "why"}, outputs_match=False)
    d = json.loads(json.dumps(report.to_dict()))
    assert {"component", "reference", "candidate", "layers", "first_over_tolerance", "first_nonfinite", "suggestion"} <= set(d)
    assert d["schema_version"] == 1
    assert {"name", "op", "max_abs", "rel_l2", "nan", "inf"} <= set(d["layers"][0])
    assert d["layers"][1]["rel_l2"] is None and d["layers"][1]["inf"] == 2  # non-finite as null, plain JSON
    assert DebugReport.from_dict(d) == report


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from latentrt.debug import plot_report

    layers = tuple(_layer(f"n{i}", 10 ** (-4 + i / 10), q=i % 3 == 0) for i in range(30)) + (_layer("bad", 0, inf=1, ref=1e6),)
    report = DebugReport(component="text_encoder_3", reference="r", candidate="c", backend="onnxruntime", precision="fp16",
                         tolerance=1e-2, calls=1, layers=layers, first_over_tolerance="n21", first_nonfinite="bad",
                         suggestion=Suggestion(text="t"))
    path = plot_report(report, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_config_validates_and_round_trips():
    import dataclasses

    from latentrt.debug import DebugConfig
    from latentrt.errors import InputError

    config = DebugConfig(component="transformer", reference="out/ref", steps=4, calls=[0, 3], tolerance=0.05)
    assert config.calls == (0, 3)
    assert DebugConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config
    with pytest.raises(InputError, match="backend must be one of onnxruntime, tensorrt"):
        DebugConfig(backend="openvino")
    with pytest.raises(InputError, match="non-negative call indices"):
        DebugConfig(calls=(-1,))

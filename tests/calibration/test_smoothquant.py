"""SmoothQuant: the scale formula, and folding it leaves the fp32 function unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from latentrt.calibration.graph import GraphIndex, find_layers, select_layers
from latentrt.calibration.smoothquant import smooth_graph, smoothing_scales


def test_smoothing_scales_formula():
    act = np.array([8.0, 1.0, 0.0, 2.0])
    w = np.array([2.0, 1.0, 3.0, 0.0])
    s = smoothing_scales(act, w, 0.5)
    np.testing.assert_allclose(s, [np.sqrt(8.0) / np.sqrt(2.0), 1.0, 1.0, 1.0], rtol=1e-6)  # zero maxima keep s = 1
    np.testing.assert_allclose(smoothing_scales(act[:2], w[:2], 1.0), [8.0, 1.0])  # alpha 1: all difficulty to the weights
    np.testing.assert_allclose(smoothing_scales(act[:2], w[:2], 0.0), [0.5, 1.0])  # alpha 0: 1 / max|W|


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(["sample"], feeds)[0]


def test_smoothing_keeps_the_fp32_function(tiny_sd3_bundle, denoiser_feeds):
    original = onnx.load(str(tiny_sd3_bundle / "onnx" / "transformer.onnx"))
    model = onnx.ModelProto()
    model.CopyFrom(original)
    index = GraphIndex(model)
    selected, _, _ = select_layers(find_layers(index))
    rng = np.random.default_rng(0)
    # Synthetic channel maxima spanning 4 decades, so the scales are far from 1.
    stats = {l.activation: 10.0 ** rng.uniform(-2, 2, index.constant(l.weight).shape[l.input_axis]) for l in selected}
    report = smooth_graph(model, selected, stats, alpha=0.8)

    # Every q/k/v and first MLP input is smoothed through AdaLN (LayerNorm and its shift); the attention
    # output (a Reshape of heads) is not, nor a tanh-GELU output (its 0.5 stays exact for FastGelu).
    assert len(report.smoothed) == 7, report.skipped  # 4 in block 0 (image and context streams), 3 in block 1
    gelu_outputs = [t for t in report.skipped if "ff/net.0/" in t or "ff_context/net.0/" in t]
    assert len(gelu_outputs) == 3 and not any("net.0/" in t for t in report.smoothed)
    assert any("Slice" in t and "cannot absorb" in why for t, why in report.skipped.items())
    onnx.checker.check_model(model)
    for feeds in (denoiser_feeds[0], denoiser_feeds[-1]):
        expected, actual = _run(original, feeds), _run(model, feeds)
        assert np.abs(actual - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
    # The layers' weights really changed.
    new_layers = {l.node: l for l in find_layers(GraphIndex(model))}
    changed = [l for l in selected if new_layers[l.node].weight != l.weight]
    assert len(changed) == sum(len(v) for v in report.smoothed.values())


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_smoothing_at_the_alpha_bounds_is_exact(tiny_sd3_bundle, denoiser_feeds, alpha):
    original = onnx.load(str(tiny_sd3_bundle / "onnx" / "transformer.onnx"))
    model = onnx.ModelProto()
    model.CopyFrom(original)
    index = GraphIndex(model)
    selected, _, _ = select_layers(find_layers(index))
    stats = {l.activation: np.linspace(0.1, 30.0, index.constant(l.weight).shape[l.input_axis]) for l in selected}
    smooth_graph(model, selected, stats, alpha=alpha)
    expected, actual = _run(original, denoiser_feeds[1]), _run(model, denoiser_feeds[1])
    assert np.abs(actual - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())

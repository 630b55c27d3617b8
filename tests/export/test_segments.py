"""SegmentedModel: a graph run slice by slice (what streamed ranges and validation use) gives the
whole graph's outputs, and records every float tensor's range on the way."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from latentrt.export.segments import SegmentedModel, plan_segments, written_weights


def _feeds(session, rng) -> dict[str, np.ndarray]:
    feeds = {}
    for i in session.get_inputs():
        shape = [2 if isinstance(d, str) or d is None else d for d in i.shape]
        if i.name == "encoder_hidden_states":
            shape[1] = 7
        feeds[i.name] = rng.standard_normal(shape).astype(np.float32) if "float" in i.type else np.zeros(shape, np.int64)
    return feeds


def test_segments_match_the_whole_graph_and_record_ranges(tiny_sd3_bundle):
    path = tiny_sd3_bundle / "onnx" / "transformer.onnx"
    whole = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = _feeds(whole, np.random.default_rng(0))
    expected = whole.run(None, feeds)

    model = onnx.load(str(path))
    budget = 64 << 10  # a few layers per segment
    assert len(plan_segments(model, budget)) > 5
    runner = SegmentedModel(model, written_weights(path), budget=budget)
    ranges: dict[str, float] = {}
    got = runner.run(None, feeds, ranges=ranges)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)

    # every initializer and the float tensors nodes make (graph inputs are the caller's), with their largest |value|
    weight = next(t for t in model.graph.initializer if len(t.dims) == 2)
    assert ranges[weight.name] == float(np.abs(onnx.numpy_helper.to_array(weight)).max())
    made = {o for n in model.graph.node for o in n.output}
    assert len(made & set(ranges)) > 0.5 * len(made)

"""PyTorch's exported attention rewritten to ONNX Runtime's MultiHeadAttention at load time."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from latentrt.runtime.ort_attention import fuse_attention, with_fused_attention


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
    path = with_fused_attention(tiny_sd3_bundle / "onnx" / "transformer.onnx", tmp_path)
    assert path is not None and path.parent == tmp_path and (tmp_path / (path.name + ".data")).is_file()
    feeds = _transformer_feeds()
    reference = _run(tiny_sd3_bundle / "onnx" / "transformer.onnx", feeds)[0]
    np.testing.assert_allclose(_run(path, feeds)[0], reference, rtol=1e-4, atol=1e-5)
    assert with_fused_attention(tiny_sd3_bundle / "onnx" / "vae_decoder.onnx", tmp_path) is None

"""TensorRT-RTX compiles the device-side step graph for the tiny-sd3 denoiser's latent profile."""

from __future__ import annotations

import onnx
import pytest

from latentrt.engines import build_serialized_engine
from latentrt.runtime.backends.tensorrt.flow_step import flow_step_model, step_specs
from latentrt.runtime.backends.tensorrt.loop import step_profile


@pytest.mark.parametrize("cfg", [True, False])
def test_step_graph_builds_for_the_denoiser_profile(rtx, manifest, tmp_path, cfg):
    axes = manifest.components["transformer"].axes
    spec = next(s for s in manifest.components["transformer"].inputs if s.name == "hidden_states")
    latent = tuple(tuple(getattr(axes[d], k) if isinstance(d, str) else d for d in spec.shape) for k in ("min", "opt", "max"))
    path = tmp_path / "flow_step.onnx"
    onnx.save(flow_step_model(len(spec.shape), cfg=cfg), str(path))
    result = build_serialized_engine(rtx, path, step_profile(latent, cfg=cfg), component="flow_step", compute_capabilities=("8.9",), opt_level=0)
    inputs, outputs = step_specs(len(spec.shape), cfg=cfg)
    assert [(t.name, t.dtype) for t in result.network.inputs] == [(s.name, s.dtype) for s in inputs]
    assert [(t.name, t.dtype) for t in result.network.outputs] == [(s.name, s.dtype) for s in outputs]
    assert len(bytes(result.data)) > 0

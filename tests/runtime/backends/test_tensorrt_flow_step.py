"""The device-side guidance + flow-matching step graph (runtime/backends/tensorrt/flow_step.py) against the numpy loop."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from latentrt.runtime.backends.tensorrt.flow_step import flow_step_model, step_specs
from latentrt.runtime.schedulers.flow_match import FlowMatchEulerConfig, FlowMatchSchedule, flow_match_sigmas
from latentrt.runtime.backends.tensorrt.loop import step_profile


def _session(rank: int, cfg: bool) -> ort.InferenceSession:
    return ort.InferenceSession(flow_step_model(rank, cfg=cfg).SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("shape", [(2, 16, 8, 12), (1, 64, 64)])  # NCHW latents; Flux's packed tokens
def test_a_whole_trajectory_matches_the_numpy_loop(cfg, shape):
    """Chained over a real schedule, the graph gives the latents `Pipeline._generate` computes in numpy."""
    sigmas, timesteps = flow_match_sigmas(FlowMatchEulerConfig(shift=3.0), 6)
    schedule = FlowMatchSchedule(sigmas=sigmas, timesteps=timesteps)
    session = _session(len(shape), cfg)
    rng = np.random.default_rng(0)
    guidance = 4.5
    host = device = rng.standard_normal(shape, dtype=np.float32)
    model_input = np.concatenate([device, device]) if cfg else device
    for i in range(len(timesteps)):
        out = rng.standard_normal(model_input.shape, dtype=np.float32)  # what the denoiser would return
        n = shape[0]
        velocity = out[:n] + guidance * (out[n:] - out[:n]) if cfg else out
        host = schedule.step(velocity, i, host)
        coefficients = np.array([guidance, np.float32(sigmas[i + 1]) - np.float32(sigmas[i])], np.float32)
        device, model_input = session.run(None, {"sample": out, "latents": device, "coefficients": coefficients})
        np.testing.assert_allclose(device, host, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(model_input, np.concatenate([device, device]) if cfg else device)


def test_specs_match_the_graph():
    for cfg in (True, False):
        model = flow_step_model(4, cfg=cfg)
        inputs, outputs = step_specs(4, cfg=cfg)
        assert [i.name for i in model.graph.input] == [s.name for s in inputs]
        assert [o.name for o in model.graph.output] == [s.name for s in outputs]
        dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input]
        assert [tuple(d) for d in dims] == [s.shape for s in inputs]


def test_step_profile_halves_the_batch_with_guidance():
    latent = ((1, 16, 4, 4), (2, 16, 64, 64), (8, 16, 96, 96))
    with_cfg = step_profile(latent, cfg=True)
    assert with_cfg["latents"] == ((1, 16, 4, 4), (1, 16, 64, 64), (4, 16, 96, 96))
    assert with_cfg["sample"] == ((2, 16, 4, 4), (2, 16, 64, 64), (8, 16, 96, 96))
    assert step_profile(latent, cfg=False)["sample"] == latent == step_profile(latent, cfg=False)["latents"]
    assert with_cfg["coefficients"] == ((2,), (2,), (2,))


def test_rank_one_latents_are_refused():
    with pytest.raises(ValueError, match="batch axis"):
        flow_step_model(1, cfg=True)

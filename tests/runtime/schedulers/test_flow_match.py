"""The numpy flow-matching scheduler against diffusers' FlowMatchEulerDiscreteScheduler itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from latentrt.errors import InputError
from latentrt.runtime.schedulers.flow_match import FlowMatchEulerConfig, calculate_mu, flow_match_sigmas, flow_match_step

CONFIGS = [
    dict(shift=1.0),
    dict(shift=3.0),
    dict(shift=3.0, shift_terminal=0.02),
    dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, time_shift_type="exponential"),
    dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, time_shift_type="linear"),
    dict(shift=1.7, num_train_timesteps=500),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 20, 28, 50])
def test_sigmas_and_timesteps_match_diffusers(config, steps):
    reference = FlowMatchEulerDiscreteScheduler(**config)
    ours = FlowMatchEulerConfig.from_diffusers(dict(reference.config))
    if ours.shift_terminal and steps == 1:  # degenerate: diffusers divides by zero
        with pytest.raises(InputError, match="shift_terminal needs num_inference_steps >= 2"):
            flow_match_sigmas(ours, steps)
        return
    mu = calculate_mu(1024, ours) if ours.use_dynamic_shifting else None
    reference.set_timesteps(steps, mu=mu)

    sigmas, timesteps = flow_match_sigmas(ours, steps, mu)

    assert sigmas.dtype == np.float32 and timesteps.dtype == np.float32
    assert sigmas.shape == (steps + 1,) and timesteps.shape == (steps,) and sigmas[-1] == 0.0
    assert np.abs(sigmas - reference.sigmas.numpy()).max() <= 1e-6
    assert np.abs(timesteps - reference.timesteps.numpy()).max() <= 1e-6 * 1000  # timesteps are sigma * 1000


def test_mu_matches_diffusers_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = FlowMatchEulerConfig(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    for seq_len in (256, 1024, 4096, 777):
        assert calculate_mu(seq_len, config) == pytest.approx(calculate_shift(seq_len, 256, 4096, 0.5, 1.15), abs=1e-12)


def test_euler_steps_match_diffusers_bit_for_bit():
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(6)
    sigmas, timesteps = flow_match_sigmas(FlowMatchEulerConfig(shift=3.0), 6)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    x_ref = torch.from_numpy(x.copy())
    for i, t in enumerate(reference.timesteps):
        v = rng.standard_normal(x.shape, dtype=np.float32)
        x_ref = reference.step(torch.from_numpy(v), t, x_ref, return_dict=False)[0]
        x = flow_match_step(x, v, sigmas[i], sigmas[i + 1])
        np.testing.assert_array_equal(x, x_ref.numpy())


def test_rejects_bad_requests():
    with pytest.raises(InputError, match="num_inference_steps must be >= 1"):
        flow_match_sigmas(FlowMatchEulerConfig(), 0)
    with pytest.raises(InputError, match="pass mu"):
        flow_match_sigmas(FlowMatchEulerConfig(use_dynamic_shifting=True), 4)
    with pytest.raises(InputError, match="use_karras_sigmas"):
        FlowMatchEulerConfig.from_diffusers({"use_karras_sigmas": True})

"""The numpy DDIM scheduler (eta = 0) against diffusers' DDIMScheduler itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from latentrt.errors import InputError
from latentrt.runtime.schedulers.ddim import DDIMConfig, ddim_schedule, make_ddim_schedule

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
CONFIGS = [
    dict(**SD, set_alpha_to_one=False, steps_offset=1),  # Stable Diffusion 1.5
    dict(**SD, timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(**SD, timestep_spacing="linspace", prediction_type="v_prediction", set_alpha_to_one=False),
    dict(beta_schedule="linear", prediction_type="sample", steps_offset=1),
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"),
    dict(**SD, num_train_timesteps=500, timestep_spacing="leading"),
]
STEPS = [1, 2, 3, 4, 7, 25, 50]


def scaled_err(ours: np.ndarray, reference) -> float:
    """max |ours - ref| / max(1, max |ref|): the error relative to the tensor's scale."""
    reference = np.asarray(reference, dtype=np.float64)
    return float(np.abs(ours - reference).max() / max(1.0, np.abs(reference).max()))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items() if k not in SD))
@pytest.mark.parametrize("steps", STEPS)
def test_schedule_and_steps_match_diffusers(config, steps):
    reference = DDIMScheduler(**config, clip_sample=False)
    reference.set_timesteps(steps)
    schedule = ddim_schedule(DDIMConfig.from_diffusers(dict(reference.config)), steps)

    assert schedule.timesteps.dtype == np.float32 and schedule.timesteps.shape == (steps,)
    np.testing.assert_array_equal(schedule.timesteps, reference.timesteps.numpy())
    assert schedule.init_noise_sigma == reference.init_noise_sigma == 1.0

    rng = np.random.default_rng(steps)
    x = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    x_ref = torch.from_numpy(x.copy())
    for i, t in enumerate(reference.timesteps[:6]):
        assert schedule.scale_model_input(x, i) is x
        out = rng.standard_normal(x.shape, dtype=np.float32)
        x_ref = reference.step(torch.from_numpy(out), t, x_ref, eta=0.0, return_dict=False)[0]
        x = schedule.step(out, i, x)
        assert x.dtype == np.float32
        assert scaled_err(x, x_ref.numpy()) <= 1e-6, f"step {i}"


def test_registry_entry_reads_a_manifest_config():
    schedule = make_ddim_schedule(dict(DDIMScheduler(**CONFIGS[0], clip_sample=False).config), 4)
    np.testing.assert_array_equal(schedule.timesteps, [751, 501, 251, 1])


@pytest.mark.parametrize(
    "config, match",
    [
        ({}, "clip_sample=True"),  # diffusers' default
        (dict(clip_sample=True), "clip_sample=True"),
        (dict(clip_sample=False, thresholding=True), "thresholding=True"),
        (dict(clip_sample=False, rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True"),
        (dict(clip_sample=False, timestep_spacing="karras"), "timestep_spacing must be one of"),
    ],
)
def test_rejects_what_it_does_not_implement(config, match):
    with pytest.raises(InputError, match=match):
        DDIMConfig.from_diffusers(config)


def test_rejects_more_steps_than_training_timesteps():
    with pytest.raises(InputError, match="between 1 and num_train_timesteps=1000"):
        ddim_schedule(DDIMConfig(), 1001)

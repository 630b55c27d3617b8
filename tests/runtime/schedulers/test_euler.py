"""The numpy Euler scheduler against diffusers' EulerDiscreteScheduler itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from latentrt.errors import InputError
from latentrt.runtime.schedulers.euler import EulerDiscreteConfig, euler_schedule, make_euler_schedule

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
CONFIGS = [
    dict(**SD, timestep_spacing="leading", steps_offset=1),  # SDXL base
    dict(**SD, timestep_spacing="linspace"),
    dict(**SD, timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(beta_schedule="linear", timestep_spacing="linspace", final_sigmas_type="sigma_min"),
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(**SD, num_train_timesteps=500, timestep_spacing="leading", prediction_type="sample"),
]
STEPS = [1, 2, 3, 4, 7, 25, 50]


def rel_err(ours: np.ndarray, reference) -> float:
    """max |ours - ref| / max(1, |ref|) per element: absolute below 1, relative above (sigmas reach ~160)."""
    reference = np.asarray(reference, dtype=np.float64)
    return float((np.abs(ours - reference) / np.maximum(1.0, np.abs(reference))).max())


def scaled_err(ours: np.ndarray, reference) -> float:
    """max |ours - ref| / max(1, max |ref|): the error relative to the tensor's scale (latents reach ~200)."""
    reference = np.asarray(reference, dtype=np.float64)
    return float(np.abs(ours - reference).max() / max(1.0, np.abs(reference).max()))


def config_id(config: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in config.items() if k not in SD or config.get("beta_schedule") != "scaled_linear")


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("steps", STEPS)
def test_schedule_and_steps_match_diffusers(config, steps):
    reference = EulerDiscreteScheduler(**config)
    reference.set_timesteps(steps)
    schedule = euler_schedule(EulerDiscreteConfig.from_diffusers(dict(reference.config)), steps)

    assert schedule.timesteps.dtype == np.float32 and schedule.sigmas.dtype == np.float32
    assert schedule.timesteps.shape == (steps,) and schedule.sigmas.shape == (steps + 1,)
    assert rel_err(schedule.timesteps, reference.timesteps.numpy()) <= 1e-6
    assert rel_err(schedule.sigmas, reference.sigmas.numpy()) <= 1e-6
    assert rel_err(np.float32(schedule.init_noise_sigma), float(reference.init_noise_sigma)) <= 1e-6

    rng = np.random.default_rng(steps)
    x = rng.standard_normal((2, 4, 8, 8), dtype=np.float32) * np.float32(schedule.init_noise_sigma)
    x_ref = torch.from_numpy(x.copy())
    for i, t in enumerate(reference.timesteps[:6]):
        model_in = schedule.scale_model_input(x, i)
        assert scaled_err(model_in, reference.scale_model_input(x_ref, t).numpy()) <= 1e-6
        out = rng.standard_normal(x.shape, dtype=np.float32)
        x_ref = reference.step(torch.from_numpy(out), t, x_ref, return_dict=False)[0]
        x = schedule.step(out, i, x)
        assert x.dtype == np.float32
        assert scaled_err(x, x_ref.numpy()) <= 1e-6, f"step {i}"


def test_registry_entry_reads_a_manifest_config():
    config = dict(EulerDiscreteScheduler(**CONFIGS[0]).config)
    schedule = make_euler_schedule(config, 4)
    np.testing.assert_array_equal(schedule.timesteps, [751, 501, 251, 1])
    with pytest.raises(InputError, match="custom sigmas"):
        make_euler_schedule(config, 4, sigmas=np.ones(4))


@pytest.mark.parametrize(
    "option, match",
    [
        (dict(use_karras_sigmas=True), "use_karras_sigmas=True"),
        (dict(use_exponential_sigmas=True), "use_exponential_sigmas=True"),
        (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True"),
        (dict(interpolation_type="log_linear"), "interpolation_type='log_linear'"),
        (dict(timestep_type="continuous"), "timestep_type='continuous'"),
        (dict(beta_schedule="sigmoid"), "beta_schedule must be one of"),
        (dict(prediction_type="flow"), "prediction_type must be one of"),
    ],
)
def test_rejects_what_it_does_not_implement(option, match):
    with pytest.raises(InputError, match=match):
        EulerDiscreteConfig.from_diffusers(option)


def test_rejects_zero_steps():
    with pytest.raises(InputError, match="num_inference_steps must be >= 1"):
        euler_schedule(EulerDiscreteConfig(), 0)

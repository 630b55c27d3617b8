"""Deterministic DDIM sampling (eta = 0) in numpy, matching diffusers' DDIMScheduler.

Song et al. 2020 (https://arxiv.org/abs/2010.02502), eq. 12 with sigma_t = 0: from the model's
prediction at timestep `t`, estimate the clean sample `x0` and the noise `eps`, then move to the
previous timestep `t'`:

    x_t' = sqrt(alpha_bar_t') * x0 + sqrt(1 - alpha_bar_t') * eps

The schedule is a pure function of the config; a step is a pure function of its inputs.
Arithmetic follows diffusers' float32 order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from latentrt.errors import InputError
from latentrt.runtime.schedulers.euler import (
    BetaSchedule,
    TimestepSpacing,
    check_choice,
    from_config_dict,
    reject_unsupported,
    spaced_timesteps,
    train_alphas_cumprod,
)

PredictionType = Literal["epsilon", "v_prediction", "sample"]


@dataclass(frozen=True)
class DDIMConfig:
    """The part of diffusers' DDIMScheduler config that shapes sampling.

    Defaults are diffusers' except `clip_sample`, which diffusers defaults to True but which
    latentrt does not implement (StableDiffusionPipeline switches it off itself).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = False
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: PredictionType = "epsilon"
    thresholding: bool = False
    timestep_spacing: TimestepSpacing = "leading"

    def __post_init__(self) -> None:
        name = "DDIMScheduler"
        check_choice(name, "beta_schedule", self.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
        check_choice(name, "prediction_type", self.prediction_type, ("epsilon", "v_prediction", "sample"))
        check_choice(name, "timestep_spacing", self.timestep_spacing, ("linspace", "leading", "trailing"))
        if self.clip_sample:
            raise InputError(
                "DDIMScheduler: clip_sample=True (clamping the predicted x0 to [-1, 1]) is not implemented by latentrt; "
                "latent diffusion models sample with clip_sample=False (StableDiffusionPipeline forces it): set "
                "\"clip_sample\": false in scheduler/scheduler_config.json"
            )
        if self.thresholding:
            raise InputError(
                "DDIMScheduler: thresholding=True (dynamic thresholding of x0) is not implemented by latentrt; it is "
                "meant for pixel-space models: set \"thresholding\": false in scheduler/scheduler_config.json"
            )

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> DDIMConfig:
        """Build from a diffusers scheduler_config.json. A missing `clip_sample` means diffusers'
        default, True, and is rejected like an explicit True."""
        reject_unsupported(config, "DDIMScheduler", ("rescale_betas_zero_snr",))
        return from_config_dict(cls, {"clip_sample": True, **config})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DDIMSchedule:
    """A DDIM (eta = 0) sampling schedule; see `runtime/schedulers/__init__.py` for the protocol.

    Attributes:
        timesteps: [steps] float32, the model's timestep input (integers, descending).
        alpha_bar: [steps] float32, alpha_bar at each timestep.
        alpha_bar_prev: [steps] float32, alpha_bar at the timestep each step moves to.
        prediction_type: what the model predicts: "epsilon", "v_prediction" or "sample".
    """

    timesteps: np.ndarray
    alpha_bar: np.ndarray
    alpha_bar_prev: np.ndarray
    prediction_type: PredictionType = "epsilon"
    init_noise_sigma: float = 1.0

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        return ddim_step(model_output, sample, self.alpha_bar[i], self.alpha_bar_prev[i], self.prediction_type)


def ddim_schedule(config: DDIMConfig, num_inference_steps: int) -> DDIMSchedule:
    """The DDIM timesteps and the alpha_bar values each step moves between."""
    T = config.num_train_timesteps
    if not 1 <= num_inference_steps <= T:
        raise InputError(f"num_inference_steps must be between 1 and num_train_timesteps={T}, got {num_inference_steps}")
    alphas_cumprod = train_alphas_cumprod(T, config.beta_start, config.beta_end, config.beta_schedule, config.trained_betas)
    # 1. The integer timesteps to sample at (linspace rounds float64 values, unlike Euler's float32 ones).
    if config.timestep_spacing == "linspace":
        timesteps = np.linspace(0, T - 1, num_inference_steps).round()[::-1].astype(np.int64)
    else:
        timesteps = spaced_timesteps(config.timestep_spacing, T, num_inference_steps, config.steps_offset).astype(np.int64)
    # 2. Each step goes back T // steps timesteps (diffusers uses this stride for every spacing).
    previous = timesteps - T // num_inference_steps
    # 3. Past the first training timestep alpha_bar is 1 (set_alpha_to_one) or alpha_bar_0.
    final = np.float32(1.0) if config.set_alpha_to_one else alphas_cumprod[0]
    alpha_bar_prev = np.where(previous >= 0, alphas_cumprod[np.maximum(previous, 0)], final).astype(np.float32)
    return DDIMSchedule(timesteps.astype(np.float32), alphas_cumprod[timesteps], alpha_bar_prev, config.prediction_type)


def ddim_step(
    model_output: np.ndarray, sample: np.ndarray, alpha_bar: np.float32, alpha_bar_prev: np.float32, prediction_type: PredictionType
) -> np.ndarray:
    """One deterministic DDIM step (float32): `x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps`."""
    sample = sample.astype(np.float32, copy=False)
    model_output = model_output.astype(np.float32, copy=False)
    a, a_prev = np.float32(alpha_bar), np.float32(alpha_bar_prev)
    b = np.float32(1.0) - a
    if prediction_type == "epsilon":
        x0 = (sample - np.sqrt(b) * model_output) / np.sqrt(a)
        eps = model_output
    elif prediction_type == "v_prediction":
        x0 = np.sqrt(a) * sample - np.sqrt(b) * model_output
        eps = np.sqrt(a) * model_output + np.sqrt(b) * sample
    else:
        x0 = model_output
        eps = (sample - np.sqrt(a) * x0) / np.sqrt(b)
    return np.sqrt(a_prev) * x0 + np.sqrt(np.float32(1.0) - a_prev) * eps


def make_ddim_schedule(
    config: dict[str, Any], num_inference_steps: int, mu: float | None = None, sigmas: np.ndarray | None = None
) -> DDIMSchedule:
    """The registry entry (runtime/schedulers/__init__.py): a manifest's DDIMScheduler config -> its schedule."""
    if mu is not None or sigmas is not None:
        raise InputError("DDIMScheduler takes neither a dynamic shift (mu) nor custom sigmas in latentrt")
    return ddim_schedule(DDIMConfig.from_diffusers(config), num_inference_steps)

"""Euler sampling of a discrete-time diffusion model in numpy, matching diffusers' EulerDiscreteScheduler.

Karras et al. 2022 (https://arxiv.org/abs/2206.00364), Algorithm 2 without churn: the model is
trained on `num_train_timesteps` noise levels `sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`;
sampling walks `sigmas[0] > ... > sigmas[n-1] > sigmas[n] = 0` with one Euler step each, on the
ODE `dx/dsigma = (x - x0_hat) / sigma`. The model sees `x / sqrt(sigma^2 + 1)` and timestep `t`.

The schedule is a pure function of the config; a step is a pure function of its inputs.
Arithmetic follows diffusers' float32 order, so results agree with it to a few float32 ulps.

    config = EulerDiscreteConfig.from_diffusers(scheduler_config_json)
    schedule = euler_schedule(config, 30)
    x = noise * schedule.init_noise_sigma
    for i, t in enumerate(schedule.timesteps):
        x = schedule.step(unet(schedule.scale_model_input(x, i), t), i, x)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np

from latentrt.errors import InputError

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
TimestepSpacing = Literal["linspace", "leading", "trailing"]

# Options diffusers' discrete-time schedulers accept that latentrt does not implement: the value
# that means "off", and what to do instead.
_UNSUPPORTED = {
    "use_karras_sigmas": (False, "use the default sigmas (use_karras_sigmas=False)"),
    "use_exponential_sigmas": (False, "use the default sigmas (use_exponential_sigmas=False)"),
    "use_beta_sigmas": (False, "use the default sigmas (use_beta_sigmas=False)"),
    "rescale_betas_zero_snr": (False, "use a model trained without zero-terminal-SNR rescaling"),
    "timestep_type": ("discrete", "use timestep_type='discrete'"),
    "interpolation_type": ("linear", "use interpolation_type='linear'"),
}


def reject_unsupported(config: dict[str, Any], scheduler: str, options: tuple[str, ...]) -> None:
    """Raise InputError when `config` switches on an option of `options` that latentrt does not implement."""
    for option in options:
        off, fix = _UNSUPPORTED[option]
        value = config.get(option, off)
        if value is not None and value != off:
            raise InputError(
                f"the {scheduler} config sets {option}={value!r}, which latentrt's numpy scheduler does not implement; "
                f"{fix} in scheduler/scheduler_config.json, or pick another scheduler"
            )


def from_config_dict(cls, config: dict[str, Any]):
    """Build a frozen config dataclass from a diffusers config dict, ignoring keys it has no field for."""
    names = {f.name for f in fields(cls)}
    values = {k: v for k, v in config.items() if k in names}
    if values.get("trained_betas") is not None:
        values["trained_betas"] = tuple(float(b) for b in values["trained_betas"])
    return cls(**values)


def check_choice(scheduler: str, option: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise InputError(f"{scheduler}: {option} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def train_alphas_cumprod(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: BetaSchedule,
    trained_betas: tuple[float, ...] | None = None,
) -> np.ndarray:
    """`alpha_bar_t = prod_{s <= t} (1 - beta_s)` for the training timesteps: [num_train_timesteps] float32.

    As diffusers computes it: float32 betas, the running product accumulated in float64 (torch's
    CPU cumprod does) and rounded to float32.
    """
    T = num_train_timesteps
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float32)
    elif beta_schedule == "linear":
        betas = _torch_linspace(beta_start, beta_end, T)
    elif beta_schedule == "scaled_linear":  # latent diffusion's schedule: linear in sqrt(beta)
        betas = _torch_linspace(beta_start**0.5, beta_end**0.5, T) ** 2
    elif beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, cosine alpha_bar
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=np.float32)
    else:
        raise InputError(
            f"beta_schedule {beta_schedule!r} is not supported; use 'linear', 'scaled_linear' or 'squaredcos_cap_v2'"
        )
    alphas = np.float32(1.0) - betas
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32: from both ends towards the middle, so both end points are exact."""
    step = np.float32((np.float32(end) - np.float32(start)) / (steps - 1))
    i = np.arange(steps)
    head = np.float32(start) + step * i.astype(np.float32)
    tail = np.float32(end) - step * (steps - 1 - i).astype(np.float32)
    return np.where(i < steps // 2, head, tail).astype(np.float32)


def spaced_timesteps(spacing: TimestepSpacing, num_train_timesteps: int, steps: int, steps_offset: int) -> np.ndarray:
    """The `steps` training timesteps to sample at, descending, float64 (Lin et al. 2023, Table 2,
    https://arxiv.org/abs/2305.08891). `linspace` may give fractional timesteps."""
    T = num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].astype(np.float64)
    if spacing == "leading":
        return (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.arange(T, 0, -T / steps).round() - 1
    raise InputError(f"timestep_spacing {spacing!r} is not supported; use 'linspace', 'leading' or 'trailing'")


@dataclass(frozen=True)
class EulerDiscreteConfig:
    """The part of diffusers' EulerDiscreteScheduler config that shapes sampling (defaults are diffusers')."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    timestep_spacing: TimestepSpacing = "linspace"
    steps_offset: int = 0
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"

    def __post_init__(self) -> None:
        name = "EulerDiscreteScheduler"
        check_choice(name, "beta_schedule", self.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
        check_choice(name, "prediction_type", self.prediction_type, ("epsilon", "v_prediction", "sample"))
        check_choice(name, "timestep_spacing", self.timestep_spacing, ("linspace", "leading", "trailing"))
        check_choice(name, "final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        if self.num_train_timesteps < 2:
            raise InputError(f"{name}: num_train_timesteps must be >= 2, got {self.num_train_timesteps}")

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> EulerDiscreteConfig:
        """Build from a diffusers scheduler_config.json; options that change sampling and that this
        scheduler does not implement (Karras/exponential/beta sigmas, zero-SNR rescaling, log-linear
        interpolation, continuous timesteps) are rejected rather than ignored."""
        reject_unsupported(config, "EulerDiscreteScheduler", tuple(_UNSUPPORTED))
        return from_config_dict(cls, config)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def euler_sigmas(config: EulerDiscreteConfig, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The sampling schedule: `sigmas` [steps + 1] float32 (the last is 0, or sigma_min with
    final_sigmas_type='sigma_min') and `timesteps` [steps] float32, what the model is fed."""
    if num_inference_steps < 1:
        raise InputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    alphas_cumprod = train_alphas_cumprod(
        config.num_train_timesteps, config.beta_start, config.beta_end, config.beta_schedule, config.trained_betas
    )
    # 1. The training noise levels, one per training timestep.
    train_sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    # 2. The timesteps to sample at, spaced over the training range.
    timesteps = spaced_timesteps(
        config.timestep_spacing, config.num_train_timesteps, num_inference_steps, config.steps_offset
    ).astype(np.float32)
    # 3. Their noise levels, interpolated linearly between training timesteps.
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    # 4. Append the final noise level.
    last = train_sigmas[0] if config.final_sigmas_type == "sigma_min" else 0.0
    return np.append(sigmas, last).astype(np.float32), timesteps


def init_noise_sigma(config: EulerDiscreteConfig, sigmas: np.ndarray) -> float:
    """The initial latents' standard deviation: the largest sigma, or sqrt(sigma_max^2 + 1) with 'leading' spacing."""
    sigma_max = np.float32(sigmas.max())
    if config.timestep_spacing in ("linspace", "trailing"):
        return float(sigma_max)
    return float(np.sqrt(sigma_max * sigma_max + np.float32(1.0)))


def euler_scale_model_input(sample: np.ndarray, sigma: np.float32) -> np.ndarray:
    """What the model sees: `x / sqrt(sigma^2 + 1)` (unit variance)."""
    return sample / np.sqrt(sigma * sigma + np.float32(1.0))


def euler_step(
    model_output: np.ndarray,
    sample: np.ndarray,
    sigma: np.float32,
    sigma_next: np.float32,
    prediction_type: Literal["epsilon", "v_prediction", "sample"],
) -> np.ndarray:
    """One Euler step from `sigma` to `sigma_next` (float32):
    `x_next = x + (x - x0_hat) / sigma * (sigma_next - sigma)`, with `x0_hat` from the model's prediction."""
    sample = sample.astype(np.float32, copy=False)
    model_output = model_output.astype(np.float32, copy=False)
    sigma, sigma_next = np.float32(sigma), np.float32(sigma_next)
    if prediction_type == "epsilon":
        denoised = sample - sigma * model_output
    elif prediction_type == "v_prediction":
        one_plus = sigma * sigma + np.float32(1.0)
        denoised = model_output * (-sigma / np.sqrt(one_plus)) + sample / one_plus
    else:
        denoised = model_output
    derivative = (sample - denoised) / sigma
    return sample + derivative * (sigma_next - sigma)


@dataclass(frozen=True)
class EulerSchedule:
    """An Euler sampling schedule; see `runtime/schedulers/__init__.py` for the protocol.

    Attributes:
        sigmas: [steps + 1] float32, decreasing.
        timesteps: [steps] float32, the model's timestep input.
        init_noise_sigma: the initial latents' standard deviation.
        prediction_type: what the model predicts: "epsilon", "v_prediction" or "sample".
    """

    sigmas: np.ndarray
    timesteps: np.ndarray
    init_noise_sigma: float
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return euler_scale_model_input(sample, self.sigmas[i])

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        return euler_step(model_output, sample, self.sigmas[i], self.sigmas[i + 1], self.prediction_type)


def euler_schedule(config: EulerDiscreteConfig, num_inference_steps: int) -> EulerSchedule:
    sigmas, timesteps = euler_sigmas(config, num_inference_steps)
    return EulerSchedule(sigmas, timesteps, init_noise_sigma(config, sigmas), config.prediction_type)


def make_euler_schedule(
    config: dict[str, Any], num_inference_steps: int, mu: float | None = None, sigmas: np.ndarray | None = None
) -> EulerSchedule:
    """The registry entry (runtime/schedulers/__init__.py): a manifest's EulerDiscreteScheduler config -> its schedule."""
    if mu is not None or sigmas is not None:
        raise InputError("EulerDiscreteScheduler takes neither a dynamic shift (mu) nor custom sigmas in latentrt")
    return euler_schedule(EulerDiscreteConfig.from_diffusers(config), num_inference_steps)

"""Flow-matching Euler sampling in numpy, matching diffusers' FlowMatchEulerDiscreteScheduler.

Rectified flow (Esser et al. 2024, https://arxiv.org/abs/2403.03206): the model predicts a velocity
`v` and one Euler step moves `x` from `sigma` to `sigma_next`. The scheduler holds no cursor: the
schedule is a pure function of the config, and a step is a pure function of its inputs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np

from latentrt.errors import InputError


@dataclass(frozen=True)
class FlowMatchEulerConfig:
    """The subset of diffusers' scheduler config that shapes the schedule (defaults are diffusers')."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: Literal["exponential", "linear"] = "exponential"
    shift_terminal: float | None = None

    def __post_init__(self) -> None:
        if self.time_shift_type not in ("exponential", "linear"):
            raise InputError(f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}")

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> FlowMatchEulerConfig:
        """Build from a diffusers scheduler_config.json; options that change the schedule and that
        this scheduler does not implement are rejected rather than silently ignored."""
        for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas", "stochastic_sampling"):
            if config.get(option):
                raise InputError(f"scheduler option {option}=True is not supported by latentrt's flow-matching scheduler yet")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calculate_mu(image_seq_len: int, config: FlowMatchEulerConfig) -> float:
    """Resolution-dependent shift (Flux, SD3.5 with dynamic shifting): linear in the image token count."""
    m = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    b = config.base_shift - m * config.base_image_seq_len
    return image_seq_len * m + b


def _time_shift(config: FlowMatchEulerConfig, mu: float, t: np.ndarray) -> np.ndarray:
    if config.time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    return mu / (mu + (1 / t - 1) ** 1.0)


def flow_match_sigmas(
    config: FlowMatchEulerConfig, num_inference_steps: int, mu: float | None = None, sigmas: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The sampling schedule: `sigmas` [steps + 1] float32 ending in 0, and `timesteps` [steps] float32 (= sigma * T).

    Args:
        num_inference_steps: number of denoising steps, >= 1.
        mu: the dynamic shift; required when `config.use_dynamic_shifting`.
        sigmas: custom unshifted sigmas [steps] (Flux passes linspace(1, 1/steps, steps)); they are
            shifted like the default ones.
    """
    if num_inference_steps < 1:
        raise InputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if config.shift_terminal and num_inference_steps < 2:
        raise InputError("a schedule stretched to shift_terminal needs num_inference_steps >= 2 (diffusers gives NaN)")
    if config.use_dynamic_shifting and mu is None:
        raise InputError("this scheduler uses dynamic shifting: pass mu (see calculate_mu)")
    T = config.num_train_timesteps
    # 1. The training schedule's end points (float32, as diffusers computes them with torch).
    train_sigmas = np.linspace(1, T, T, dtype=np.float32)[::-1] / np.float32(T)
    if not config.use_dynamic_shifting:
        s = np.float32(config.shift)
        train_sigmas = s * train_sigmas / (1 + (s - 1) * train_sigmas)
    sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])
    # 2. Evenly spaced timesteps between them, in float64 (or the caller's sigmas, in float32).
    if sigmas is None:
        sigmas = np.linspace(sigma_max * T, sigma_min * T, num_inference_steps) / T
    else:
        sigmas = np.asarray(sigmas, dtype=np.float32)
    # 3. Shift: resolution-dependent or static.
    if config.use_dynamic_shifting:
        sigmas = _time_shift(config, mu, sigmas)
    else:
        sigmas = config.shift * sigmas / (1 + (config.shift - 1) * sigmas)
    # 4. Optionally stretch so the schedule ends at shift_terminal.
    if config.shift_terminal:
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - config.shift_terminal))
    sigmas = sigmas.astype(np.float32)
    timesteps = sigmas * np.float32(T)
    # 5. Append the terminal sigma.
    return np.append(sigmas, np.float32(0.0)), timesteps


def flow_match_step(sample: np.ndarray, velocity: np.ndarray, sigma: float, sigma_next: float) -> np.ndarray:
    """One Euler step of the probability-flow ODE: `x_next = x + (sigma_next - sigma) * v` (float32)."""
    dt = np.float32(sigma_next) - np.float32(sigma)
    return sample.astype(np.float32, copy=False) + dt * velocity.astype(np.float32, copy=False)


@dataclass(frozen=True)
class FlowMatchSchedule:
    """A flow-matching sampling schedule; see `runtime/schedulers/__init__.py` for the protocol."""

    sigmas: np.ndarray
    timesteps: np.ndarray
    init_noise_sigma: float = 1.0

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        return flow_match_step(sample, model_output, self.sigmas[i], self.sigmas[i + 1])

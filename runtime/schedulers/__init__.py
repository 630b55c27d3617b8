"""The scheduler protocol and the registry from diffusers class names to numpy implementations.

A scheduler here is a pure function from its config and a step count to a `Schedule`: immutable
arrays plus two pure functions. There is no step cursor; the sampling loop passes the step index.

    schedule = make_schedule(manifest.scheduler, num_inference_steps)
    x = x * schedule.init_noise_sigma
    for i, t in enumerate(schedule.timesteps):
        v = model(schedule.scale_model_input(x, i), t)
        x = schedule.step(v, i, x)
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from latentrt.errors import BundleError
from latentrt.runtime.schedulers.ddim import make_ddim_schedule
from latentrt.runtime.schedulers.euler import make_euler_schedule
from latentrt.runtime.schedulers.flow_match import FlowMatchEulerConfig, FlowMatchSchedule, flow_match_sigmas


class Schedule(Protocol):
    timesteps: np.ndarray  # [steps] float32: what the denoiser is fed as its timestep
    init_noise_sigma: float  # initial latents are standard normal times this

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray: ...

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray: ...


def _flow_match(config: dict[str, Any], steps: int, mu: float | None, sigmas: np.ndarray | None) -> Schedule:
    sig, timesteps = flow_match_sigmas(FlowMatchEulerConfig.from_diffusers(config), steps, mu, sigmas)
    return FlowMatchSchedule(sig, timesteps)


SCHEDULERS = {"FlowMatchEulerDiscreteScheduler": _flow_match, "EulerDiscreteScheduler": make_euler_schedule, "DDIMScheduler": make_ddim_schedule}


def make_schedule(
    scheduler: dict[str, Any], num_inference_steps: int, *, mu: float | None = None, sigmas: np.ndarray | None = None
) -> Schedule:
    """The schedule for the manifest's `scheduler` entry ({"class_name": ..., "config": {...}})."""
    name = scheduler.get("class_name")
    if name not in SCHEDULERS:
        raise BundleError(f"the bundle's scheduler {name!r} has no numpy implementation; supported: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](scheduler.get("config", {}), num_inference_steps, mu, sigmas)

"""The denoising loop on the GPU for flow-matching families on TensorRT.

`Pipeline` uses it when the backend is TensorRT, the schedule is a `FlowMatchSchedule` and the
family's model output is one of the denoiser's outputs unchanged (SD3, Flux). The latents stay on
the device from the first step to the last:

    host -> device once:  the conditioning, the initial latents
    per step:             the timestep ([batch] floats) and [guidance, dt] (8 bytes), host -> device,
                          from pinned memory (the copies do not wait for the GPU)
    device -> host once:  the final latents (the VAE's latent scaling and Flux's unpacking run in
                          numpy, so the stage boundaries text -> denoiser -> VAE each pass the host
                          once per call, never per step)

Per step the denoiser engine runs, then the step engine (`flow_step.py`: guidance and the Euler
step) reads the denoiser's output buffer and writes the next denoiser input straight into the
denoiser's input buffer; a device-to-device copy carries the new latents to the step's input.
The buffers it binds across engines are checked first: same dtype (float32), same shape, enough
bytes. Steps are timed with CUDA events; the host waits for the GPU once per call (and after each
step only when a callback wants to hear about it).

CUDA graphs: the second step's work (denoiser, step, copy) is captured into a graph and replayed for
every later step; the per-step uploads go to the same addresses before each replay, so the graph
stays valid. The capture is skipped when TensorRT-RTX says a context cannot be captured
(`is_stream_capturable`); TensorRT-RTX then captures each engine's work itself (its
WHOLE_GRAPH_CAPTURE strategy). Any failure while capturing (enqueue, end of capture, instantiation)
falls back to enqueueing the steps one by one. `DeviceDenoiser.last_run` says what happened (graph
replays, synchronizations, why a capture was not used), which the GPU tests assert.

Needs a GPU, TensorRT (or TensorRT-RTX on a GPU it supports) and cuda-python. The step graph itself
is checked against the numpy loop with ONNX Runtime, and built with TensorRT-RTX, on any machine
(tests/runtime/backends/test_tensorrt_flow_step.py); the loop's graph and fallback logic run on a GPU
with stand-in engines (tests/runtime/backends/test_tensorrt_device.py).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentrt.errors import LatentRTError
from latentrt.runtime.backends.tensorrt.device import Captured, capture_graph
from latentrt.runtime.engine import OnDevice

log = logging.getLogger(__name__)

Feeds = Callable[[Any, np.float32], Mapping[str, Any]]


def step_profile(latent_profile: tuple[tuple[int, ...], ...], *, cfg: bool) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The step engine's (min, opt, max) shapes from the denoiser's profile for its latent input.

    With guidance the denoiser's batch is twice the latents' batch.
    """
    lo, opt, hi = latent_profile
    if not cfg:
        latents = (lo, opt, hi)
    else:
        latents = tuple((max(1, s[0] // 2), *s[1:]) for s in (lo, opt, hi))
    sample = tuple(((2 if cfg else 1) * s[0], *s[1:]) for s in latents)
    return {"sample": sample, "latents": latents, "coefficients": (((2,),) * 3)}


def build_step_engine(denoiser: Any, latent_input: str, *, cfg: bool) -> Any:
    """Build the step graph for the denoiser's latent profile with the denoiser's library (a second or
    so), on the denoiser's GPU resources."""
    import onnx

    from latentrt.engines.build import build_serialized_engine
    from latentrt.engines.library import current_compute_capability, load_library
    from latentrt.runtime.backends.tensorrt.engine import TensorRTEngine
    from latentrt.runtime.backends.tensorrt.flow_step import flow_step_model, step_specs

    target = denoiser.target
    library = load_library(target)  # type: ignore[arg-type]
    rank = len(denoiser.profile[latent_input][0])
    ccs = (current_compute_capability(denoiser.device),) if target == "tensorrt-rtx" else ()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "flow_step.onnx"
        onnx.save(flow_step_model(rank, cfg=cfg), str(onnx_path))
        built = build_serialized_engine(
            library, onnx_path, step_profile(denoiser.profile[latent_input], cfg=cfg), component="flow_step", compute_capabilities=ccs
        )
        engine_path = Path(tmp) / "flow_step.engine"
        engine_path.write_bytes(bytes(built.data))
        inputs, outputs = step_specs(rank, cfg=cfg)
        return TensorRTEngine(engine_path, inputs, outputs, target=target, resources=denoiser.resources)


@dataclass
class LoopRun:
    """What one `DeviceDenoiser.run` did, for tests and diagnostics.

    Attributes:
        steps: denoising steps run.
        graph: "replayed" (steps 2.. replayed one captured CUDA graph), "library" (TensorRT-RTX
            captured each engine itself), "off" (graphs disabled) or "not captured: <why>".
        graph_launches: how many times the captured graph was launched.
        synchronizations: how many times the host waited for the GPU.
        step_times: seconds per step from CUDA events (empty when not asked for).
    """

    steps: int = 0
    graph: str = "off"
    graph_launches: int = 0
    synchronizations: int = 0
    step_times: list[float] = field(default_factory=list)


class DeviceDenoiser:
    """Runs every denoising step of one call on the device (see the module docstring).

    Args:
        denoiser: the denoiser's engine (`TensorRTEngine`, or anything with its stage / enqueue /
            bind / address / capacity / output_shape / forget / resources interface).
        latent_input: its input that takes the latents; velocity_output: its output the scheduler reads.
        graphs: capture steps 2.. into a CUDA graph (shapes are fixed within one call); default True.
        step_engine_factory: builds the step engine `(denoiser, latent_input, cfg=...) -> engine`;
            by default the flow-step graph built with the denoiser's library.
    """

    def __init__(
        self,
        denoiser: Any,
        latent_input: str,
        velocity_output: str,
        *,
        graphs: bool | None = None,
        step_engine_factory: Callable[..., Any] | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.latent_input = latent_input
        self.velocity_output = velocity_output
        self.graphs = True if graphs is None else graphs
        self._factory = step_engine_factory or build_step_engine
        self._steps: dict[bool, Any] = {}
        self.last_run = LoopRun()
        self._check_dtypes()

    def _check_dtypes(self) -> None:
        dtypes = {s.name: s.dtype for s in (*self.denoiser.inputs, *self.denoiser.outputs)}
        wrong = {n: dtypes.get(n) for n in (self.latent_input, self.velocity_output) if dtypes.get(n) != "float32"}
        if wrong:
            raise LatentRTError(
                f"the device loop's step graph reads and writes float32, but the denoiser's {wrong} are not float32; "
                "re-export the bundle (its graph inputs and outputs stay float32 at every precision)"
            )

    def step_engine(self, cfg: bool) -> Any:
        if cfg not in self._steps:
            self._steps[cfg] = self._factory(self.denoiser, self.latent_input, cfg=cfg)
        return self._steps[cfg]

    def run(
        self,
        latents: np.ndarray,
        feeds: Feeds,
        timesteps: np.ndarray,
        sigmas: np.ndarray,
        *,
        guidance: float,
        cfg: bool,
        callback: Callable[[int, int], None] | None = None,
        step_times: list[float] | None = None,
    ) -> np.ndarray:
        """Denoise `latents` [b, ...] over `timesteps`; returns the final latents on the host.

        `feeds(model_input, t)` gives the denoiser's inputs for timestep t with `model_input` in the
        latent input's place; the first call passes the array, later calls an `OnDevice`. Step times
        (CUDA events) are added to `step_times` when given.
        """
        resources = self.denoiser.resources
        with resources.lock:
            resources.activate()
            return self._run(resources, latents, feeds, timesteps, sigmas, guidance=guidance, cfg=cfg, callback=callback, step_times=step_times)

    def _run(self, resources, latents, feeds, timesteps, sigmas, *, guidance, cfg, callback, step_times) -> np.ndarray:  # noqa: ANN001
        den, step = self.denoiser, self.step_engine(cfg)
        stream = resources.stream
        latents = np.ascontiguousarray(latents, dtype=np.float32)
        model_input = np.concatenate([latents, latents]) if cfg else latents
        nbytes = latents.nbytes
        run = LoopRun(steps=len(timesteps), graph="on" if self.graphs else "off")
        events = resources.events(len(timesteps) + 1) if step_times is not None else None
        resources.reset_pinned()
        captured: Captured | None = None
        try:
            for i, t in enumerate(timesteps):
                if events is not None:
                    resources.record(events[i])
                den.stage(feeds(model_input if i == 0 else OnDevice(model_input.shape), t), stream=stream, pinned=resources if i else None)
                if i == 0:
                    self._bind(den, step, model_input, latents)
                coefficients = np.array([guidance, np.float32(sigmas[i + 1]) - np.float32(sigmas[i])], np.float32)
                step.stage(
                    {"sample": OnDevice(model_input.shape), "latents": latents if i == 0 else OnDevice(latents.shape), "coefficients": coefficients},
                    stream=stream,
                    pinned=resources,
                )
                if i == 1 and run.graph == "on":
                    captured = capture_graph(stream, lambda: self._enqueue_step(step, stream, nbytes))
                    run.graph = "replayed" if captured.ok else f"not captured: {captured.reason}"
                    if not captured.ok:
                        log.warning("CUDA graph capture failed (%s); the steps run without a graph", captured.reason)
                if captured is not None and captured.ok:
                    captured.launch(stream)
                    run.graph_launches += 1
                else:
                    self._enqueue_step(step, stream, nbytes)
                if i == 0 and run.graph == "on" and len(timesteps) > 1:
                    run.graph = self._graph_mode(den, step, stream)
                if callback:
                    resources.synchronize()
                    run.synchronizations += 1
                    callback(i + 1, len(timesteps))
            if events is not None:
                resources.record(events[len(timesteps)])
            out = step.buffers.download("latents", latents.shape, np.float32, stream=stream)
            resources.synchronize()
            run.synchronizations += 1
        finally:
            den.forget(self.latent_input)  # both buffers now hold device-written data
            step.forget("latents")
            if captured is not None and captured.ok:
                resources.synchronize()
                captured.destroy()
        if events is not None:
            run.step_times = [resources.elapsed(events[i], events[i + 1]) for i in range(len(timesteps))]
            for i, seconds in enumerate(run.step_times):
                step_times[i] += seconds
        if hasattr(den, "after_call"):
            den.after_call()
        self.last_run = run
        return out

    def _bind(self, den: Any, step: Any, model_input: np.ndarray, latents: np.ndarray) -> None:
        """Bind the step engine to the denoiser's buffers for this call, after checking they fit."""
        velocity = tuple(den.output_shape(self.velocity_output))
        if velocity != model_input.shape:
            raise LatentRTError(
                f"the denoiser's {self.velocity_output!r} has shape {velocity} for latents {model_input.shape}: the device loop "
                "needs the model output in the latents' shape (run this family with the host loop)"
            )
        need = model_input.nbytes
        for name in (self.latent_input, self.velocity_output):
            if den.capacity(name) < need:
                raise LatentRTError(f"the denoiser's buffer for {name!r} holds {den.capacity(name)} bytes, the step writes {need}")
        step.bind("sample", den.address(self.velocity_output))
        step.bind("model_input", den.address(self.latent_input))

    def _graph_mode(self, den: Any, step: Any, stream: int) -> str:
        """After the first step: "on" (capture the next), or why not. Contexts TensorRT-RTX cannot
        stream-capture switch to its own per-engine graphs (new contexts; the next step stages anew)."""
        engines = (den, step)
        if any(getattr(e, "graph_mode", "capture") == "library" for e in engines):
            return "library"
        capturable = [e.is_stream_capturable(stream) if hasattr(e, "is_stream_capturable") else None for e in engines]
        if False not in capturable:
            return "on"
        reason = "TensorRT-RTX reports a context that cannot be stream-captured"
        library = all(e.use_library_graphs() for e in engines if hasattr(e, "use_library_graphs"))
        log.info("%s; %s", reason, "it captures each engine's work itself from now on" if library else "the steps run without a graph")
        return "library" if library else f"not captured: {reason}"

    def _enqueue_step(self, step: Any, stream: int, nbytes: int) -> None:
        """Denoiser, step engine, new latents into the step's input buffer: one step's device work."""
        self.denoiser.enqueue(stream)
        step.enqueue(stream)
        step.buffers.copy_within("latents", "latents_next", nbytes, stream=stream)

    def close(self) -> None:
        for engine in self._steps.values():
            engine.close()
        self._steps.clear()


class ComponentDeviceLoop:
    """`DeviceDenoiser` over a `TensorRTComponent`: each call runs on the engine whose profile fits it."""

    def __init__(self, component: Any, latent_input: str, velocity_output: str) -> None:
        self.component = component
        self.latent_input = latent_input
        self.velocity_output = velocity_output
        self._loops: dict[int, DeviceDenoiser] = {}
        self.last: DeviceDenoiser | None = None

    def loop_for(self, latents: np.ndarray, feeds: Feeds, t0: Any, *, cfg: bool) -> DeviceDenoiser:
        model_input = np.concatenate([latents, latents]) if cfg else latents
        shapes = {n: np.shape(v) if not isinstance(v, OnDevice) else v.shape for n, v in feeds(model_input, t0).items()}
        engine = self.component.engine_for(shapes)
        if id(engine) not in self._loops:
            self._loops[id(engine)] = engine.device_loop(self.latent_input, self.velocity_output)
            self.component._loops[(id(engine), self.latent_input, self.velocity_output)] = self._loops[id(engine)]
        return self._loops[id(engine)]

    def run(self, latents: np.ndarray, feeds: Feeds, timesteps: np.ndarray, sigmas: np.ndarray, **kwargs: Any) -> np.ndarray:
        loop = self.loop_for(latents, feeds, timesteps[0], cfg=kwargs.get("cfg", False))
        self.last = loop
        return loop.run(latents, feeds, timesteps, sigmas, **kwargs)

    @property
    def last_run(self) -> LoopRun | None:
        return None if self.last is None else self.last.last_run

    def close(self) -> None:
        for loop in self._loops.values():
            loop.close()
        self._loops.clear()

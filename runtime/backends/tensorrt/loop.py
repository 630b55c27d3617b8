"""The denoising loop on the GPU for flow-matching families on TensorRT.

`Pipeline` uses it when the backend is TensorRT, the schedule is a `FlowMatchSchedule` and the
family's model output is one of the denoiser's outputs unchanged (SD3, Flux). The latents stay on
the device from the first step to the last:

    host -> device once:  the conditioning, the initial latents
    per step:             the timestep ([batch] floats) and [guidance, dt] (8 bytes), host -> device
    device -> host once:  the final latents (the VAE's latent scaling and Flux's unpacking run in
                          numpy, so the stage boundaries text -> denoiser -> VAE each pass the host
                          once per call, never per step)

Per step the denoiser engine runs, then the step engine (`runtime/backends/tensorrt/flow_step.py`: guidance and the
Euler step) reads the denoiser's output buffer and writes the next denoiser input straight into the
denoiser's input buffer; a device-to-device copy carries the new latents to the step's input.
Nothing is read back to the host between steps. With NVIDIA TensorRT the second step is captured
into a CUDA graph (denoiser, step, copy: three launches become one) and replayed for every later
step; the per-step uploads go to the same addresses before each replay, so the graph stays valid.
TensorRT-RTX captures only engines built for user-allocated memory (its own whole-graph capture
strategy is the way there), so with it, and whenever a capture fails, the steps are enqueued one by
one. The loop waits for each step to finish, to time it and call the callback.

Needs a GPU, TensorRT (or TensorRT-RTX on a GPU it supports) and cuda-python; tested only where they
are (tests/runtime/backends/test_tensorrt_engine.py). The step graph itself is checked against the numpy
loop with ONNX Runtime, and built with TensorRT-RTX, on any machine (tests/runtime/backends/test_tensorrt_flow_step.py).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from latentrt.runtime.backends.tensorrt.engine import TensorRTEngine
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


def build_step_engine(denoiser: TensorRTEngine, latent_input: str, *, cfg: bool) -> TensorRTEngine:
    """Build the step graph for the denoiser's latent profile with the denoiser's library (a second or so)."""
    import onnx

    from latentrt.engines.build import build_serialized_engine
    from latentrt.engines.library import current_compute_capability, load_library
    from latentrt.runtime.backends.tensorrt.flow_step import flow_step_model, step_specs

    target, device = denoiser.target, denoiser.device
    library = load_library(target)  # type: ignore[arg-type]
    rank = len(denoiser.profile[latent_input][0])
    ccs = (current_compute_capability(device),) if target == "tensorrt-rtx" else ()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "flow_step.onnx"
        onnx.save(flow_step_model(rank, cfg=cfg), str(onnx_path))
        built = build_serialized_engine(
            library, onnx_path, step_profile(denoiser.profile[latent_input], cfg=cfg), component="flow_step", compute_capabilities=ccs
        )
        engine_path = Path(tmp) / "flow_step.engine"
        engine_path.write_bytes(bytes(built.data))
        inputs, outputs = step_specs(rank, cfg=cfg)
        return TensorRTEngine(engine_path, inputs, outputs, target=target, device=device)


class DeviceDenoiser:
    """Runs every denoising step of one call on the device (see the module docstring).

    Args:
        denoiser: the denoiser's engine.
        latent_input: its input that takes the latents; velocity_output: its output the scheduler reads.
        graphs: capture steps 2.. into a CUDA graph (shapes are fixed within one call); by default
            with NVIDIA TensorRT only.
    """

    def __init__(self, denoiser: TensorRTEngine, latent_input: str, velocity_output: str, *, graphs: bool | None = None) -> None:
        self.denoiser = denoiser
        self.latent_input = latent_input
        self.velocity_output = velocity_output
        self.graphs = denoiser.target == "tensorrt" if graphs is None else graphs
        self._steps: dict[bool, TensorRTEngine] = {}

    def step_engine(self, cfg: bool) -> TensorRTEngine:
        if cfg not in self._steps:
            engine = build_step_engine(self.denoiser, self.latent_input, cfg=cfg)
            engine.bind("sample", self.denoiser.address(self.velocity_output))
            engine.bind("model_input", self.denoiser.address(self.latent_input))
            self._steps[cfg] = engine
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
        latent input's place; the first call passes the array, later calls an `OnDevice`.
        """
        from latentrt.engines.library import cuda_check, load_cudart

        cudart = load_cudart()
        den, step = self.denoiser, self.step_engine(cfg)
        stream = den.buffers.stream
        latents = np.ascontiguousarray(latents, dtype=np.float32)
        model_input = np.concatenate([latents, latents]) if cfg else latents
        nbytes = latents.nbytes
        graph = exec_graph = None
        try:
            for i, t in enumerate(timesteps):
                t0 = time.perf_counter()
                den.stage(feeds(model_input if i == 0 else OnDevice(model_input.shape), t), stream=stream)
                coefficients = np.array([guidance, np.float32(sigmas[i + 1]) - np.float32(sigmas[i])], np.float32)
                step.stage(
                    {
                        "sample": OnDevice(model_input.shape),
                        "latents": latents if i == 0 else OnDevice(latents.shape),
                        "coefficients": coefficients,
                    },
                    stream=stream,
                )
                if exec_graph is None and self.graphs and i == 1:
                    graph, exec_graph = _capture(cudart, stream, lambda: self._enqueue_step(step, stream, nbytes))
                if exec_graph is not None:
                    cuda_check(cudart.cudaGraphLaunch(exec_graph, stream), "cudaGraphLaunch")
                else:
                    self._enqueue_step(step, stream, nbytes)
                if step_times is not None or callback is not None:
                    cuda_check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
                if step_times is not None:
                    step_times[i] += time.perf_counter() - t0
                if callback:
                    callback(i + 1, len(timesteps))
            out = step.buffers.download("latents", latents.shape, np.float32, stream=stream)
            cuda_check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        finally:
            den.forget(self.latent_input)  # both buffers now hold device-written data
            step.forget("latents")
            den.buffers.synchronize()  # the shared stream: every queued copy and launch
            step.buffers.synchronize()
            if exec_graph is not None:
                cudart.cudaGraphExecDestroy(exec_graph)
            if graph is not None:
                cudart.cudaGraphDestroy(graph)
        return out

    def _enqueue_step(self, step: TensorRTEngine, stream: int, nbytes: int) -> None:
        """Denoiser, step engine, new latents into the step's input buffer: one step's device work."""
        self.denoiser.enqueue(stream)
        step.enqueue(stream)
        step.buffers.copy_within("latents", "latents_next", nbytes, stream=stream)

    def close(self) -> None:
        for engine in self._steps.values():
            engine.close()
        self._steps.clear()


def _capture(cudart: Any, stream: int, enqueue: Callable[[], None]) -> tuple[Any, Any]:
    """Capture `enqueue()`'s work on `stream` into an instantiated CUDA graph; (None, None) when the
    capture fails, with the stream usable again and the work not run."""
    from latentrt.engines.library import cuda_check

    mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    cuda_check(cudart.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
    try:
        enqueue()
    except Exception as err:  # noqa: BLE001 - any failure means: run the step without a graph
        result = cudart.cudaStreamEndCapture(stream)
        if int(result[0]) == 0 and result[1] is not None:
            cudart.cudaGraphDestroy(result[1])
        log.warning("CUDA graph capture failed (%s); the steps run without a graph", err)
        return None, None
    graph = cuda_check(cudart.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
    return graph, cuda_check(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")

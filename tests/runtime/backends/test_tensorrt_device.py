"""The TensorRT backend's GPU plumbing on a real GPU, without TensorRT (marked gpu).

What runs here needs a CUDA GPU, cuda-python and CuPy (for stand-in kernels), not TensorRT: device
buffers and their growth, the shared activation buffer, pinned uploads, CUDA-event timing, CUDA-graph
capture and its fallback, the device loop (`DeviceDenoiser`) with stand-in denoiser and step engines
whose kernels do the flow-matching arithmetic, close() returning device memory to its baseline,
two pipelines' resources in one process, calls from several threads.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from latentrt.bundle.manifest import TensorSpec
from latentrt.engines.memory import tensor_nbytes
from latentrt.errors import InputError, LatentRTError

pytestmark = pytest.mark.gpu


def _cudart_or_skip():
    try:
        from latentrt.engines.library import load_cudart

        cudart = load_cudart()
    except InputError:
        pytest.skip("cuda-python is not installed: pip install cuda-python")
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        pytest.skip("no CUDA GPU is visible")
    return cudart


@pytest.fixture(scope="module")
def cudart():
    return _cudart_or_skip()


@pytest.fixture(scope="module")
def cp(cudart):
    return pytest.importorskip("cupy", reason="the stand-in kernels need CuPy (pip install cupy-cuda12x)")


def _in_use():
    from latentrt.runtime.backends.tensorrt.device import device_memory_in_use

    return device_memory_in_use(0)


# ---------------------------------------------------------------------------------------------
# Buffers, arena, pinned memory, events
# ---------------------------------------------------------------------------------------------


def test_buffers_round_trip_and_grow(cudart):
    from latentrt.runtime.backends.tensorrt.device import DeviceBuffers, plan_buffers

    data = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    plans = plan_buffers({"x": (4, 5, 7), "y": (4, 5, 7)}, {"x": "float32", "y": "float32"})
    with DeviceBuffers(plans, dtypes={"ids": "int64"}) as buffers:
        assert buffers.address("x") % 256 == 0 and buffers.capacity("x") == 768
        buffers.upload("x", data)
        out = buffers.download("x", data.shape, np.float32)
        buffers.synchronize()
        np.testing.assert_array_equal(out, data)
        buffers.copy_within("y", "x", data.nbytes)
        out_y = buffers.download("y", data.shape, np.float32)
        buffers.synchronize()
        np.testing.assert_array_equal(out_y, data)
        with pytest.raises(InputError, match="do not fit its buffer"):
            buffers.upload("x", np.zeros((8, 5, 7), np.float32))
        before = buffers.address("x")
        assert not buffers.ensure("x", 700)  # fits: nothing moves
        assert buffers.ensure("x", 8 * 5 * 7 * 4, shape=(8, 5, 7)) and buffers.capacity("x") == 1280
        big = np.arange(8 * 5 * 7, dtype=np.float32).reshape(8, 5, 7)
        buffers.upload("x", big)
        got = buffers.download("x", big.shape, np.float32)
        buffers.synchronize()
        np.testing.assert_array_equal(got, big)
        assert buffers.address("x") != before or buffers.capacity("x") == 1280
        ids = np.arange(2 * 77, dtype=np.int64).reshape(2, 77)
        buffers.ensure("ids", ids.nbytes, shape=ids.shape)  # allocated on demand
        buffers.upload("ids", ids)
        got_ids = buffers.download("ids", ids.shape, np.int64)
        buffers.synchronize()
        np.testing.assert_array_equal(got_ids, ids)


def test_activation_arena_grows_and_is_shared(cudart):
    from latentrt.runtime.backends.tensorrt.device import DeviceResources

    resources = DeviceResources(0).retain()
    try:
        ptr, size = resources.activation(3 << 20)
        assert size == 3 << 20 and resources.arena_generation == 1
        assert resources.activation(1 << 20) == (ptr, size)  # smaller need: same buffer
        ptr2, size2 = resources.activation((5 << 20) + 1)
        assert size2 == 6 << 20 and resources.arena_generation == 2
        assert resources.activation(6 << 20) == (ptr2, size2)
        assert resources.peak_arena_bytes == 6 << 20
    finally:
        resources.release()
    assert resources.closed


def test_pinned_uploads_and_event_timing(cudart):
    from latentrt.runtime.backends.tensorrt.device import DeviceBuffers, DeviceResources

    resources = DeviceResources(0).retain()
    buffers = DeviceBuffers({}, dtypes={"t": "float32"}, resources=resources)
    try:
        buffers.ensure("t", 64 * 4)
        events = resources.events(3)
        results = []
        resources.reset_pinned()
        for step in range(2):
            resources.record(events[step])
            value = np.full(64, step + 0.5, np.float32)
            pinned = resources.pinned_copy(value)
            assert pinned.ctypes.data != value.ctypes.data and np.array_equal(pinned, value)
            buffers.upload("t", pinned)
            results.append(buffers.download("t", (64,), np.float32))
        resources.record(events[2])
        resources.synchronize()
        assert [r[0] for r in results] == [0.5, 1.5]
        assert all(resources.elapsed(events[i], events[i + 1]) >= 0 for i in range(2))
        # more pinned memory than one chunk holds: a second chunk
        big = resources.pinned_copy(np.ones((1 << 18) + 1, np.float32))
        assert big.nbytes > 1 << 20 and float(big.sum()) == (1 << 18) + 1
    finally:
        buffers.close()
        resources.release()


# ---------------------------------------------------------------------------------------------
# CUDA graphs: capture and fallback
# ---------------------------------------------------------------------------------------------


def test_capture_replays_copies(cudart):
    from latentrt.runtime.backends.tensorrt.device import DeviceBuffers, capture_graph

    with DeviceBuffers({}, dtypes={"a": "float32", "b": "float32"}) as buffers:
        buffers.ensure("a", 1024)
        buffers.ensure("b", 1024)
        stream = buffers.stream
        captured = capture_graph(stream, lambda: buffers.copy_within("b", "a", 1024, stream=stream))
        assert captured.ok and captured.reason == ""
        for value in (1.0, 2.0):
            buffers.upload("a", np.full(256, value, np.float32))
            captured.launch(stream)
            out = buffers.download("b", (256,), np.float32)
            buffers.synchronize()
            assert out[0] == value and out[-1] == value
        captured.destroy()


def test_capture_failures_fall_back_with_the_stream_usable(cudart):
    from latentrt.runtime.backends.tensorrt.device import DeviceBuffers, capture_graph

    with DeviceBuffers({}, dtypes={"a": "float32", "b": "float32"}) as buffers:
        buffers.ensure("a", 1024)
        buffers.ensure("b", 1024)
        stream = buffers.stream

        def raises():
            buffers.copy_within("b", "a", 1024, stream=stream)
            raise LatentRTError("enqueue failed")

        failed = capture_graph(stream, raises)
        assert not failed.ok and "enqueue failed" in failed.reason

        def invalidates():  # a synchronization inside a capture is illegal and invalidates it
            cudart.cudaStreamSynchronize(stream)

        invalid = capture_graph(stream, invalidates)  # the error shows only when the capture ends
        assert not invalid.ok and "cudaStreamEndCapture failed with cudaErrorStreamCaptureInvalidated" in invalid.reason

        def invalidates_then_copies():
            cudart.cudaStreamSynchronize(stream)
            buffers.copy_within("b", "a", 1024, stream=stream)

        later = capture_graph(stream, invalidates_then_copies)  # the next queued copy reports it
        assert not later.ok and "cudaErrorStreamCaptureInvalidated" in later.reason
        status = cudart.cudaStreamIsCapturing(stream)[1]
        assert status == cudart.cudaStreamCaptureStatus.cudaStreamCaptureStatusNone
        buffers.upload("a", np.full(256, 3.0, np.float32))
        buffers.copy_within("b", "a", 1024)
        out = buffers.download("b", (256,), np.float32)
        buffers.synchronize()  # the stream works after both failures
        assert out[0] == 3.0


# ---------------------------------------------------------------------------------------------
# The device loop with stand-in engines (CuPy kernels in place of TensorRT)
# ---------------------------------------------------------------------------------------------


class StandInEngine:
    """The slice of `TensorRTEngine` the device loop uses, with a CuPy kernel in place of TensorRT:
    buffers grown on demand, pinned uploads, bound foreign buffers, enqueue on the shared stream."""

    def __init__(self, cp, inputs, outputs, kernel, resources, *, fail_in_capture=False):
        from latentrt.runtime.backends.tensorrt.device import DeviceBuffers

        self.cp = cp
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        self.kernel = kernel  # kernel(engine, arrays) launches on the current CuPy stream
        self.resources = resources.retain()
        self.buffers = DeviceBuffers({}, dtypes={s.name: s.dtype for s in (*inputs, *outputs)}, resources=resources)
        self.target, self.device, self.graph_mode = "stand-in", 0, "capture"
        self.profile = {s.name: ((1,) * len(s.shape), (1,) * len(s.shape), (64,) * len(s.shape)) for s in inputs}
        self._shapes, self._bound, self._resident = {}, {}, {}
        self.fail_in_capture = fail_in_capture
        self.calls = 0

    def stage(self, feeds, *, stream=None, pinned=None):
        self._shapes = {n: tuple(v.shape) for n, v in feeds.items()}
        for spec in (*self.inputs, *self.outputs):
            if spec.name in self._bound:
                continue
            shape = self._shapes.get(spec.name) or self.output_shape(spec.name)
            self.buffers.ensure(spec.name, tensor_nbytes(shape, spec.dtype), shape=shape)
        for spec in self.inputs:
            value = feeds[spec.name]
            if isinstance(value, np.ndarray) and self._resident.get(spec.name) is not value:
                self.buffers.upload(spec.name, pinned.pinned_copy(value) if pinned is not None else value, stream=stream)
                self._resident[spec.name] = value

    def output_shape(self, name):
        return self._shape_of[name](self._shapes)

    def address(self, name):
        return self._bound.get(name) or self.buffers.address(name)

    def capacity(self, name):
        return 0 if name in self._bound else self.buffers.capacity(name)

    def bind(self, name, address):
        self._bound[name] = address

    def forget(self, name):
        self._resident.pop(name, None)

    def array(self, name, shape):
        cp = self.cp
        nbytes = int(np.prod(shape)) * 4
        memory = cp.cuda.UnownedMemory(self.address(name), nbytes, owner=self)
        return cp.ndarray(shape, dtype=cp.float32, memptr=cp.cuda.MemoryPointer(memory, 0))

    def enqueue(self, stream=None):
        cudart = _cudart_or_skip()
        if self.fail_in_capture and int(cudart.cudaStreamIsCapturing(stream)[1]) != 0:
            raise LatentRTError("this stand-in cannot be captured")
        with self.cp.cuda.ExternalStream(int(stream)):
            self.kernel(self)
        self.calls += 1

    def after_call(self):
        pass

    def close(self):
        self.buffers.close()
        self.resources.release()


def _stand_ins(cp, resources, shape, *, cfg, fail_in_capture=False):
    """A denoiser v = 0.5 x + 0.001 t (per batch row) and the flow step with guidance, as CuPy kernels."""
    b = shape[0]
    rows = 2 * b if cfg else b
    dims = tuple(f"d{i}" for i in range(1, len(shape)))
    per_row = int(np.prod(shape[1:]))
    velocity = cp.ElementwiseKernel(
        "float32 x, raw float32 t, int32 per", "float32 y", "y = x * 0.5f + t[i / per] * 0.001f", "standin_velocity"
    )
    step_kernel = cp.ElementwiseKernel(
        "raw float32 sample, raw float32 coef, raw float32 latents, int32 n, bool cfg",
        "raw float32 latents_next, raw float32 model_input",
        """
        float v = sample[i];
        if (cfg) { float u = sample[i]; float c = sample[i + n]; v = u + coef[0] * (c - u); }
        float next = latents[i] + coef[1] * v;
        latents_next[i] = next;
        model_input[i] = next;
        if (cfg) model_input[i + n] = next;
        """,
        "standin_step",
    )

    def denoise(engine):
        x = engine.array("hidden_states", (rows, *shape[1:]))
        t = engine.array("timestep", (rows,))
        y = engine.array("sample", (rows, *shape[1:]))
        velocity(x, t, np.int32(per_row), y)

    def step(engine):
        n = b * per_row
        sample = engine.array("sample", (rows * per_row,))
        coef = engine.array("coefficients", (2,))
        latents = engine.array("latents", (n,))
        latents_next = engine.array("latents_next", (n,))
        model_input = engine.array("model_input", (rows * per_row,))
        step_kernel(sample, coef, latents, np.int32(n), bool(cfg), latents_next, model_input, size=n)

    den = StandInEngine(
        cp,
        [TensorSpec("hidden_states", "float32", ("batch", *dims)), TensorSpec("timestep", "float32", ("batch",))],
        [TensorSpec("sample", "float32", ("batch", *dims))],
        denoise,
        resources,
        fail_in_capture=fail_in_capture,
    )
    den._shape_of = {"sample": lambda s: s["hidden_states"]}
    stepper = StandInEngine(
        cp,
        [TensorSpec("sample", "float32", ("call", *dims)), TensorSpec("latents", "float32", ("batch", *dims)), TensorSpec("coefficients", "float32", (2,))],
        [TensorSpec("latents_next", "float32", ("batch", *dims)), TensorSpec("model_input", "float32", ("call", *dims))],
        step,
        resources,
    )
    stepper._shape_of = {"latents_next": lambda s: s["latents"], "model_input": lambda s: s["sample"]}
    return den, stepper


def _numpy_loop(latents, timesteps, sigmas, guidance, cfg):
    x = latents.copy()
    for i, t in enumerate(timesteps):
        model_in = np.concatenate([x, x]) if cfg else x
        v = model_in * np.float32(0.5) + np.float32(t) * np.float32(0.001)
        if cfg:
            u, c = v[: len(x)], v[len(x) :]
            v = u + np.float32(guidance) * (c - u)
        x = x + (np.float32(sigmas[i + 1]) - np.float32(sigmas[i])) * v
    return x


def _run_loop(cp, *, cfg=True, graphs=True, fail_in_capture=False, callback=None, steps=6, shape=(2, 4, 8, 8), seed=0):
    from latentrt.runtime.backends.tensorrt.device import DeviceResources
    from latentrt.runtime.backends.tensorrt.loop import DeviceDenoiser

    resources = DeviceResources(0).retain()
    den, stepper = _stand_ins(cp, resources, shape, cfg=cfg, fail_in_capture=fail_in_capture)
    try:
        loop = DeviceDenoiser(den, "hidden_states", "sample", graphs=graphs, step_engine_factory=lambda d, name, cfg: stepper)
        rng = np.random.default_rng(seed)
        latents = rng.standard_normal(shape, dtype=np.float32)
        sigmas = np.linspace(1.0, 0.0, steps + 1, dtype=np.float32)
        timesteps = sigmas[:-1] * 1000
        feeds = lambda x, t: {"hidden_states": x, "timestep": np.full((x.shape[0],), t, np.float32)}  # noqa: E731
        times = [0.0] * steps
        out = loop.run(latents, feeds, timesteps, sigmas, guidance=4.0, cfg=cfg, callback=callback, step_times=times)
        expected = _numpy_loop(latents, timesteps, sigmas, 4.0, cfg)
        return out, expected, loop.last_run, times, den, stepper
    finally:
        den.close()
        stepper.close()
        resources.release()


def test_device_loop_replays_one_graph_and_synchronizes_once(cp):
    out, expected, run, times, den, stepper = _run_loop(cp)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert run.graph == "replayed" and run.graph_launches == 5  # steps 2..6
    assert den.calls == 2 and stepper.calls == 2  # step 1 enqueued, step 2 captured (not run), then replays
    assert run.synchronizations == 1
    assert len(run.step_times) == 6 and all(t > 0 for t in run.step_times) and times == run.step_times


def test_device_loop_without_guidance(cp):
    out, expected, run, _, _, _ = _run_loop(cp, cfg=False, shape=(1, 16, 4, 4))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert run.graph == "replayed"


def test_device_loop_packed_latents(cp):
    """Flux's packed latents [b, tokens, 64]: rank 3."""
    out, expected, run, _, _, _ = _run_loop(cp, cfg=False, shape=(2, 16, 64))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_device_loop_falls_back_when_capture_fails(cp):
    out, expected, run, _, den, _ = _run_loop(cp, fail_in_capture=True)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert run.graph.startswith("not captured: the work could not be captured") and run.graph_launches == 0
    assert den.calls == 6


def test_device_loop_without_graphs_and_with_a_callback(cp):
    seen = []
    out, expected, run, _, den, _ = _run_loop(cp, graphs=False, callback=lambda i, n: seen.append((i, n)))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert run.graph == "off" and den.calls == 6
    assert seen == [(i, 6) for i in range(1, 7)] and run.synchronizations == 7


def test_device_loop_from_several_threads(cp):
    results = {}

    def work(seed):
        out, expected, *_ = _run_loop(cp, seed=seed)
        results[seed] = float(np.abs(out - expected).max())

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1, 2] and max(results.values()) < 1e-5


# ---------------------------------------------------------------------------------------------
# Cleanup
# ---------------------------------------------------------------------------------------------


def test_close_returns_device_memory_to_its_baseline(cudart, cp):
    from latentrt.runtime.backends.tensorrt.device import DeviceBuffers, DeviceResources

    _run_loop(cp)  # warm up: CUDA context, CuPy kernels
    cp.get_default_memory_pool().free_all_blocks()
    baseline = _in_use()
    pipelines = []
    for _ in range(2):  # two pipelines' resources in one process
        resources = DeviceResources(0).retain()
        resources.activation(256 << 20)
        buffers = DeviceBuffers({}, dtypes={"x": "float32"}, resources=resources)
        buffers.ensure("x", 128 << 20)
        buffers.ensure("x", 192 << 20)  # grown: the old buffer is freed
        pipelines.append((resources, buffers))
    during = _in_use()
    assert during - baseline >= 2 * (256 + 192) << 20
    for resources, buffers in pipelines:
        buffers.close()
        resources.release()
        assert resources.closed
    after = _in_use()
    assert abs(after - baseline) <= 4 << 20, (baseline, during, after)

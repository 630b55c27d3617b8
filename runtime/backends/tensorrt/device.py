"""GPU resources of the TensorRT backend, through cuda-python: no TensorRT in this module.

`DeviceResources` is what the engines of one pipeline share on one GPU:

- one CUDA stream: the engines run one after the other on it, which is what lets them share
- one **activation arena**: TensorRT execution contexts are created with user-managed memory and
  all take their scratch memory from this one buffer, grown on demand to the largest need so far
  (NVIDIA's diffusion demo does the same; TensorRT's default gives every context its own
  allocation sized for its profile's maximum, all resident at once);
- pinned host memory for the small per-step uploads (a copy from pageable memory waits for the
  stream, a copy from pinned memory does not);
- CUDA events to time steps without synchronizing;
- a lock: one pipeline's engines are used by one call at a time (calls from several threads
  serialize), and every call first makes the pipeline's GPU current in the calling thread.

`DeviceBuffers` are one engine's input/output buffers, allocated for the shapes asked for and grown
when a larger shape comes. `capture_graph` records a stream's work into a CUDA graph, or says why
it could not, leaving the stream usable.

Everything is freed by `close()` (or when the last engine releases the resources); as a last
resort at interpreter exit (before CUDA itself is torn down), never by garbage collection alone.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from latentrt.engines.memory import ALIGNMENT, aligned, tensor_nbytes
from latentrt.errors import InputError, LatentRTError

log = logging.getLogger(__name__)

_ARENA_GRANULE = 1 << 20  # the activation arena grows in whole MiB
_PINNED_CHUNK = 1 << 20


@dataclass(frozen=True)
class BufferPlan:
    """One device buffer: the tensor's largest shape and the bytes allocated for it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def plan_buffers(
    shapes: Mapping[str, Sequence[int]],
    dtypes: Mapping[str, str],
    *,
    alignment: int = ALIGNMENT,
) -> dict[str, BufferPlan]:
    """One device buffer per tensor, sized for `shapes`, rounded up to `alignment` bytes.

    A zero-sized tensor still gets `alignment` bytes, so that its address is a valid allocation.

    Args:
        shapes: per tensor name, its shape.
        dtypes: per tensor name, the manifest dtype ("float32", "int64", ...).

    Example:
        >>> plan_buffers({"x": (2, 3)}, {"x": "float32"})["x"].nbytes
        256
    """
    missing = [n for n in shapes if n not in dtypes]
    if missing:
        raise InputError(f"no dtype for tensors {missing}")
    return {
        name: BufferPlan(name, dtypes[name], tuple(int(d) for d in shape), aligned(tensor_nbytes(shape, dtypes[name]), alignment))
        for name, shape in shapes.items()
    }


def _cuda():
    from latentrt.engines.library import cuda_check, load_cudart

    return load_cudart(), cuda_check


def _free_all(cudart: Any, state: dict[str, Any]) -> None:
    """Free everything in `state` (also run by weakref.finalize at exit); errors are ignored."""
    stream = state.get("stream")
    if stream is not None:
        cudart.cudaStreamSynchronize(stream)
    if state.get("arena"):
        cudart.cudaFree(state["arena"])
    for ptr in state.get("pinned", ()):
        cudart.cudaFreeHost(ptr)
    for event in state.get("events", ()):
        cudart.cudaEventDestroy(event)
    if stream is not None:
        cudart.cudaStreamDestroy(stream)
    state.clear()


class DeviceResources:
    """A CUDA stream, the shared activation arena, pinned staging memory and a lock, on one GPU.

    Engines `retain()` it when created and `release()` it when closed; the last release frees
    everything. Use `close()` to free it at once.

    Args:
        device: the CUDA device ordinal.

    Raises:
        InputError: cuda-python is not installed.
        LatentRTError: a CUDA call failed (no device); the message names the call.
    """

    def __init__(self, device: int = 0) -> None:
        self._cudart, self._check = _cuda()
        self.device = device
        self.lock = threading.RLock()
        self._users = 0
        self._state: dict[str, Any] = {"stream": None, "arena": 0, "pinned": [], "events": []}
        self._finalizer = weakref.finalize(self, _free_all, self._cudart, self._state)
        self.arena_bytes = 0
        self.arena_generation = 0  # changes whenever the arena moves
        self.peak_arena_bytes = 0
        self._pinned: list[tuple[int, np.ndarray]] = []  # (pointer, uint8 view) chunks
        self._pinned_at = (0, 0)  # (chunk index, offset) of the next free pinned byte
        self.activate()
        flags = self._cudart.cudaStreamNonBlocking
        self._state["stream"] = self._check(self._cudart.cudaStreamCreateWithFlags(flags), "cudaStreamCreateWithFlags")

    # -- lifetime -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._state.get("stream") is None

    def activate(self) -> None:
        """Make this GPU current in the calling thread (CUDA's current device is per thread)."""
        self._check(self._cudart.cudaSetDevice(self.device), "cudaSetDevice")

    def retain(self) -> DeviceResources:
        self._users += 1
        return self

    def release(self) -> None:
        self._users -= 1
        if self._users <= 0:
            self.close()

    def close(self) -> None:
        """Wait for queued work, then free the arena, pinned memory, events and the stream."""
        with self.lock:
            if not self.closed:
                self.activate()
            self._pinned = []
            self.arena_bytes = 0
            self._finalizer()

    # -- the stream -----------------------------------------------------------------------------

    @property
    def stream(self) -> int:
        """The stream's handle, as TensorRT's `execute_async_v3` takes it."""
        stream = self._state.get("stream")
        if stream is None:
            raise LatentRTError("the pipeline's GPU resources are closed; load the pipeline again")
        return int(stream)

    def synchronize(self) -> None:
        self._check(self._cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    # -- the activation arena ---------------------------------------------------------------------

    def activation(self, nbytes: int) -> tuple[int, int]:
        """(pointer, size) of the shared activation buffer, grown to hold at least `nbytes`.

        Growing waits for the stream (the old buffer may be in use), frees it and allocates the new
        size, so contexts must re-read the pointer before each enqueue (`arena_generation` changes).
        """
        if nbytes > self.arena_bytes:
            size = -(-int(nbytes) // _ARENA_GRANULE) * _ARENA_GRANULE
            self.synchronize()
            if self._state["arena"]:
                self._check(self._cudart.cudaFree(self._state["arena"]), "cudaFree")
                self._state["arena"], self.arena_bytes = 0, 0
            ptr = self._check(self._cudart.cudaMalloc(size), f"cudaMalloc({size}) for the shared activation buffer")
            self._state["arena"], self.arena_bytes = int(ptr), size
            self.arena_generation += 1
            self.peak_arena_bytes = max(self.peak_arena_bytes, size)
            log.debug("shared activation buffer: %d MiB", size >> 20)
        return self._state["arena"], self.arena_bytes

    # -- pinned staging ---------------------------------------------------------------------------

    def reset_pinned(self) -> None:
        """Reuse the pinned memory from the start: only once the stream has finished the copies
        queued from it (at the start of a call, after the previous call synchronized)."""
        self._pinned_at = (0, 0)

    def pinned_copy(self, array: np.ndarray) -> np.ndarray:
        """A copy of `array` in pinned host memory, valid until `reset_pinned()`; copies queued from it
        do not wait for the stream."""
        array = np.ascontiguousarray(array)
        nbytes = aligned(array.nbytes, 64)
        index, offset = self._pinned_at
        while index < len(self._pinned) and offset + nbytes > self._pinned[index][1].nbytes:
            index, offset = index + 1, 0
        if index == len(self._pinned):
            size = max(_PINNED_CHUNK, nbytes)
            ptr = int(self._check(self._cudart.cudaMallocHost(size), f"cudaMallocHost({size})"))
            self._state["pinned"].append(ptr)
            view = np.frombuffer((ctypes.c_uint8 * size).from_address(ptr), dtype=np.uint8)
            self._pinned.append((ptr, view))
        chunk = self._pinned[index][1]
        out = chunk[offset : offset + array.nbytes].view(array.dtype).reshape(array.shape)
        out[...] = array
        self._pinned_at = (index, offset + nbytes)
        return out

    # -- events -----------------------------------------------------------------------------------

    def events(self, count: int) -> list[Any]:
        """`count` timing events (created once, reused by later calls)."""
        pool = self._state["events"]
        while len(pool) < count:
            pool.append(self._check(self._cudart.cudaEventCreate(), "cudaEventCreate"))
        return pool[:count]

    def record(self, event: Any) -> None:
        self._check(self._cudart.cudaEventRecord(event, self.stream), "cudaEventRecord")

    def elapsed(self, start: Any, end: Any) -> float:
        """Seconds between two recorded events (both must have completed)."""
        return float(self._check(self._cudart.cudaEventElapsedTime(start, end), "cudaEventElapsedTime")) / 1000.0


class DeviceBuffers:
    """One engine's device buffers, on its `DeviceResources`' stream.

    Buffers are allocated by `ensure(name, nbytes)` (at least `nbytes`, grown when more is asked;
    growing waits for the stream and may move the buffer: re-read `address` afterwards). `plans`
    given to the constructor are allocated at once. Copies are queued on the stream; arrays
    returned by `download` are valid after `synchronize()`.

    Args:
        plans: buffers to allocate now (`plan_buffers`), or {} to allocate on demand.
        dtypes: the dtype of every tensor that may get a buffer (default: the plans').
        device: the CUDA device ordinal, when `resources` is not given.
        resources: the stream and lock to use (shared by a pipeline's engines); by default its own.
    """

    def __init__(
        self,
        plans: Mapping[str, BufferPlan] | None = None,
        *,
        dtypes: Mapping[str, str] | None = None,
        device: int = 0,
        resources: DeviceResources | None = None,
    ) -> None:
        self._cudart, self._check = _cuda()
        self.plans: dict[str, BufferPlan] = {}
        self.dtypes = dict(dtypes or {}) | {n: p.dtype for n, p in (plans or {}).items()}
        self._own = resources is None
        self.resources = (resources or DeviceResources(device)).retain()
        self._ptrs: dict[str, int] = {}
        self._state = self._ptrs
        self._finalizer = weakref.finalize(self, _free_buffers, self._cudart, self._ptrs)
        self._pending: list[np.ndarray] = []  # host arrays in flight, kept alive until synchronize()
        try:
            for name, plan in (plans or {}).items():
                self.ensure(name, plan.nbytes, shape=plan.shape)
        except BaseException:
            self.close()
            raise

    @property
    def stream(self) -> int:
        return self.resources.stream

    def address(self, name: str) -> int:
        return self._ptrs[name]

    def capacity(self, name: str) -> int:
        """Bytes allocated for `name` (0 when it has no buffer yet)."""
        plan = self.plans.get(name)
        return plan.nbytes if plan else 0

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.plans.values())

    def ensure(self, name: str, nbytes: int, *, shape: Sequence[int] = ()) -> bool:
        """Make buffer `name` hold at least `nbytes`; True when it was (re)allocated (its address changed)."""
        if nbytes <= self.capacity(name):
            return False
        size = aligned(nbytes)
        if name in self._ptrs:
            self.resources.synchronize()  # queued work may still use the old buffer
            self._check(self._cudart.cudaFree(self._ptrs.pop(name)), "cudaFree")
        self._ptrs[name] = int(self._check(self._cudart.cudaMalloc(size), f"cudaMalloc({size}) for {name!r}"))
        self.plans[name] = BufferPlan(name, self.dtypes.get(name, "uint8"), tuple(int(d) for d in shape), size)
        return True

    def upload(self, name: str, array: np.ndarray, *, stream: int | None = None) -> None:
        """Queue a copy of `array` into buffer `name` (on `stream`, by default the resources').

        Raises:
            InputError: the array is larger than the buffer.
        """
        array = np.ascontiguousarray(array)
        if array.nbytes > self.capacity(name):
            raise InputError(
                f"{name!r}: {array.nbytes} bytes of shape {array.shape} do not fit its buffer of {self.capacity(name)} bytes "
                f"(allocated for shape {self.plans[name].shape if name in self.plans else ()})"
            )
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        target = self.stream if stream is None else stream
        self._check(self._cudart.cudaMemcpyAsync(self._ptrs[name], array.ctypes.data, array.nbytes, kind, target), "cudaMemcpyAsync")
        self._pending.append(array)

    def copy_within(self, dst: str, src: str, nbytes: int, *, stream: int | None = None) -> None:
        """Queue a device-to-device copy of `nbytes` from buffer `src` to buffer `dst`."""
        if nbytes > min(self.capacity(dst), self.capacity(src)):
            raise InputError(f"{nbytes} bytes do not fit buffers {dst!r} and {src!r}")
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        target = self.stream if stream is None else stream
        self._check(self._cudart.cudaMemcpyAsync(self._ptrs[dst], self._ptrs[src], nbytes, kind, target), "cudaMemcpyAsync")

    def download(self, name: str, shape: Sequence[int], dtype: Any, *, stream: int | None = None) -> np.ndarray:
        """Queue a copy of buffer `name`'s first `shape` elements into a new array (valid once the stream
        is synchronized)."""
        out = np.empty(tuple(shape), dtype=dtype)
        if out.nbytes > self.capacity(name):
            raise InputError(f"{name!r}: shape {tuple(shape)} is larger than its buffer of {self.capacity(name)} bytes")
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        target = self.stream if stream is None else stream
        self._check(self._cudart.cudaMemcpyAsync(out.ctypes.data, self._ptrs[name], out.nbytes, kind, target), "cudaMemcpyAsync")
        return out

    def synchronize(self) -> None:
        self.resources.synchronize()
        self._pending.clear()

    def close(self) -> None:
        """Free the buffers (after the stream's queued work) and release the resources."""
        resources = getattr(self, "resources", None)
        if resources is None:
            return
        if not resources.closed:
            resources.activate()
            resources.synchronize()
        self._finalizer()
        self.plans.clear()
        self._pending.clear()
        self.resources = None  # type: ignore[assignment]
        resources.release()

    def __enter__(self) -> DeviceBuffers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _free_buffers(cudart: Any, ptrs: dict[str, int]) -> None:
    for ptr in ptrs.values():
        cudart.cudaFree(ptr)
    ptrs.clear()


@dataclass(frozen=True)
class Captured:
    """The result of `capture_graph`: an instantiated graph, or why there is none."""

    graph: Any = None
    exec_graph: Any = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.exec_graph is not None

    def launch(self, stream: int) -> None:
        from latentrt.engines.library import cuda_check, load_cudart

        cuda_check(load_cudart().cudaGraphLaunch(self.exec_graph, stream), "cudaGraphLaunch")

    def destroy(self) -> None:
        from latentrt.engines.library import load_cudart

        cudart = load_cudart()
        if self.exec_graph is not None:
            cudart.cudaGraphExecDestroy(self.exec_graph)
        if self.graph is not None:
            cudart.cudaGraphDestroy(self.graph)


def capture_graph(stream: int, enqueue: Callable[[], None]) -> Captured:
    """Capture the work `enqueue()` queues on `stream` into an instantiated CUDA graph.

    Any failure (beginning the capture, `enqueue` raising, the capture being invalidated by an
    operation that cannot be captured, ending it, instantiating the graph) gives `Captured(reason=...)`
    with nothing run, the stream out of capture mode and the error state cleared: the caller then
    runs the work without a graph. The captured work is not run either: launch the graph.
    """
    from latentrt.engines.library import load_cudart

    cudart = load_cudart()
    mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    err = cudart.cudaStreamBeginCapture(stream, mode)[0]
    if int(err) != 0:
        cudart.cudaGetLastError()
        return Captured(reason=f"cudaStreamBeginCapture failed with {_name(err)}")
    failure = ""
    try:
        enqueue()
    except Exception as error:  # noqa: BLE001 - any failure means: run the work without a graph
        failure = f"the work could not be captured ({error})"
    err, graph = cudart.cudaStreamEndCapture(stream)
    if int(err) != 0 or graph is None or failure:
        if int(err) == 0 and graph is not None:
            cudart.cudaGraphDestroy(graph)
        _leave_capture(cudart, stream)
        cudart.cudaGetLastError()  # the capture error is not sticky: clear it
        return Captured(reason=failure or f"cudaStreamEndCapture failed with {_name(err)}")
    err, exec_graph = cudart.cudaGraphInstantiate(graph, 0)
    if int(err) != 0:
        cudart.cudaGraphDestroy(graph)
        cudart.cudaGetLastError()
        return Captured(reason=f"cudaGraphInstantiate failed with {_name(err)}")
    return Captured(graph=graph, exec_graph=exec_graph)


def _leave_capture(cudart: Any, stream: int) -> None:
    """End a capture still open on `stream` (after a failure inside it)."""
    err, status = cudart.cudaStreamIsCapturing(stream)
    if int(err) == 0 and status != cudart.cudaStreamCaptureStatus.cudaStreamCaptureStatusNone:
        err, graph = cudart.cudaStreamEndCapture(stream)
        if int(err) == 0 and graph is not None:
            cudart.cudaGraphDestroy(graph)


def _name(err: Any) -> str:
    return getattr(err, "name", str(err))


def device_memory_in_use(device: int = 0) -> int:
    """Bytes of GPU memory in use on `device` (total - free, all processes), for leak checks."""
    cudart, check = _cuda()
    check(cudart.cudaSetDevice(device), "cudaSetDevice")
    free, total = check(cudart.cudaMemGetInfo(), "cudaMemGetInfo")
    return int(total) - int(free)

"""TensorRT backend: one deserialized engine per component behind the engine contract.

`TensorRTEngine(path, inputs, outputs)` is called like the ONNX Runtime engine:
`engine({name: ndarray}) -> {name: ndarray}`, with `inputs` / `outputs` (the manifest's
`TensorSpec`s). Under the call: every input's shape is set on the execution context
(`set_input_shape`), copied to device memory, `execute_async_v3` runs on the engine's own CUDA
stream, and the outputs are copied back. Device memory comes from cuda-python (`cudaMalloc`) once,
sized for the profile's max shapes, so a call allocates only the numpy outputs.

The device-free parts (shape resolution, buffer planning, feed checks, picking a bundle's engine)
are plain functions, tested without a GPU. TensorRT and cuda-python are imported only when an
engine is created.

Example:
    >>> engines = load_engines("bundles/sd3", load_manifest("bundles/sd3"))  # doctest: +SKIP
    >>> engines["vae_decoder"]({"latent_sample": latents})["sample"].shape  # doctest: +SKIP
    (1, 3, 1024, 1024)
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentrt.errors import BundleError, InputError, LatentRTError
from latentrt.bundle.manifest import Manifest, TensorSpec
from latentrt.runtime.engine import BackendOptions, OnDevice

log = logging.getLogger(__name__)

# Bytes per element of the dtypes engines exchange with the host.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "float8_e4m3fn": 1,
}
ALIGNMENT = 256  # cudaMalloc returns 256-byte aligned memory; sizes are rounded up to it too


@dataclass(frozen=True)
class BufferPlan:
    """One device buffer: the tensor's largest shape and the bytes allocated for it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def resolve_shape(shape: Sequence[int | str], sizes: Mapping[str, int]) -> tuple[int, ...]:
    """Replace axis names by their sizes: ("batch", 16, "h") with {"batch": 2, "h": 8} -> (2, 16, 8).

    Raises:
        InputError: an axis name has no size in `sizes`.
    """
    out = []
    for dim in shape:
        if isinstance(dim, str):
            if dim not in sizes:
                raise InputError(f"axis {dim!r} of shape {tuple(shape)} has no size; known axes: {sorted(sizes)}")
            out.append(int(sizes[dim]))
        else:
            out.append(int(dim))
    return tuple(out)


def tensor_nbytes(shape: Sequence[int], dtype: str) -> int:
    """Bytes of a dense tensor.

    Raises:
        InputError: unknown dtype, or a negative (unresolved) dimension.
    """
    if dtype not in DTYPE_ITEMSIZE:
        raise InputError(f"dtype {dtype!r} has no known size; expected one of {sorted(DTYPE_ITEMSIZE)}")
    if any(int(d) < 0 for d in shape):
        raise InputError(f"shape {tuple(shape)} has an unresolved (negative) dimension; a buffer needs concrete sizes")
    return math.prod(int(d) for d in shape) * DTYPE_ITEMSIZE[dtype]


def plan_buffers(
    shapes: Mapping[str, Sequence[int]],
    dtypes: Mapping[str, str],
    *,
    alignment: int = ALIGNMENT,
) -> dict[str, BufferPlan]:
    """One device buffer per tensor, sized for its largest shape, rounded up to `alignment` bytes.

    A zero-sized tensor still gets `alignment` bytes, so that its address is a valid allocation.

    Args:
        shapes: per tensor name, its largest shape (the profile's max for inputs; for outputs what
            the engine reports at those input shapes).
        dtypes: per tensor name, the manifest dtype ("float32", "int64", ...).

    Example:
        >>> plan_buffers({"x": (2, 3)}, {"x": "float32"})["x"].nbytes
        256
    """
    missing = [n for n in shapes if n not in dtypes]
    if missing:
        raise InputError(f"no dtype for tensors {missing}")
    plans = {}
    for name, shape in shapes.items():
        size = tensor_nbytes(shape, dtypes[name])
        padded = max(alignment, -(-size // alignment) * alignment)
        plans[name] = BufferPlan(name, dtypes[name], tuple(int(d) for d in shape), padded)
    return plans


def check_feed_shapes(
    feeds: Mapping[str, Sequence[int]],
    profile: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]],
) -> None:
    """Every feed's shape must lie inside the engine's profile (min <= shape <= max per dimension).

    Args:
        feeds: per input name, the shape of the array passed in.
        profile: per input name, the engine's (min, opt, max) shapes.

    Raises:
        InputError: a missing input, a wrong rank, or a dimension outside the profile; the message
            says which engines to rebuild with a larger range.
    """
    for name, (lo, _, hi) in profile.items():
        if name not in feeds:
            raise InputError(f"missing input {name!r}; this engine takes {sorted(profile)}")
        shape = tuple(int(d) for d in feeds[name])
        if len(shape) != len(lo):
            raise InputError(f"input {name!r} has shape {shape}, expected rank {len(lo)} (profile max {tuple(hi)})")
        for i, (size, a, b) in enumerate(zip(shape, lo, hi)):
            if not a <= size <= b:
                raise InputError(
                    f"input {name!r} has shape {shape}: dimension {i} is {size}, outside the engine's profile "
                    f"{a}..{b} (min {tuple(lo)}, max {tuple(hi)}); rebuild the engines with `latentrt build` for a wider range"
                )


def select_engine(
    bundle: str | os.PathLike,
    manifest: Manifest,
    component: str,
    *,
    compute_capability: str | None = None,
) -> Any:
    """The engine to run for `component`: intact, built from the manifest's present ONNX file.

    Among several, engines that target `compute_capability` (or the library's portable default)
    come first, then the newest.

    Returns:
        Its `EngineRecord` (from `latentrt.engines.cache`).

    Raises:
        BundleError: no such engine; the message says how to build one.
    """
    from latentrt.engines.cache import list_engines

    current = [s.record for s in list_engines(bundle, manifest) if s.component == component and s.status == "current"]
    if not current:
        raise BundleError(
            f"{bundle}: no TensorRT engine for component {component!r} matches the manifest's ONNX file; "
            f"build them with `latentrt build {bundle}`"
        )

    def fits(record: Any) -> bool:
        ccs = record.spec.compute_capabilities
        return compute_capability is None or not ccs or compute_capability in ccs

    return max(current, key=lambda r: (fits(r), r.created))


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype for a manifest dtype name (bfloat16 and float8 through ml_dtypes).

    Raises:
        InputError: the dtype has no numpy equivalent here.
    """
    try:
        return np.dtype(dtype)
    except TypeError:
        pass
    try:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, dtype))
    except (ImportError, AttributeError) as err:
        raise InputError(f"dtype {dtype!r} needs the ml_dtypes package for numpy arrays: pip install ml-dtypes") from err


class DeviceBuffers:
    """Device memory for planned tensors plus one CUDA stream, through cuda-python.

    Copies are queued on the stream; arrays returned by `download` are valid after `synchronize()`.
    Use it as a context manager or call `close()`.

    Args:
        plans: the buffers to allocate (`plan_buffers`).
        device: the CUDA device ordinal.

    Raises:
        InputError: cuda-python is not installed.
        LatentRTError: a CUDA call failed (no device, out of memory); the message names the call.
    """

    def __init__(self, plans: Mapping[str, BufferPlan], *, device: int = 0) -> None:
        from latentrt.engines.library import cuda_check, load_cudart

        self.plans = dict(plans)
        self._cudart = load_cudart()
        self._check = cuda_check
        self._ptrs: dict[str, int] = {}
        self._stream: Any = None
        self._pending: list[np.ndarray] = []  # host arrays in flight, kept alive until synchronize()
        cuda_check(self._cudart.cudaSetDevice(device), "cudaSetDevice")
        try:
            self._stream = cuda_check(self._cudart.cudaStreamCreate(), "cudaStreamCreate")
            for name, plan in self.plans.items():
                self._ptrs[name] = int(cuda_check(self._cudart.cudaMalloc(plan.nbytes), f"cudaMalloc({plan.nbytes}) for {name!r}"))
        except BaseException:
            self.close()
            raise

    @property
    def stream(self) -> int:
        """The stream's handle, as TensorRT's `execute_async_v3` takes it."""
        if self._stream is None:
            raise LatentRTError("the device buffers are closed")
        return int(self._stream)

    def address(self, name: str) -> int:
        return self._ptrs[name]

    def upload(self, name: str, array: np.ndarray, *, stream: int | None = None) -> None:
        """Queue a copy of `array` into buffer `name` (on `stream`, by default this object's).

        Raises:
            InputError: the array is larger than the buffer planned for it.
        """
        array = np.ascontiguousarray(array)
        if array.nbytes > self.plans[name].nbytes:
            raise InputError(
                f"{name!r}: {array.nbytes} bytes of shape {array.shape} do not fit its buffer of {self.plans[name].nbytes} bytes "
                f"(planned for shape {self.plans[name].shape})"
            )
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        target = self.stream if stream is None else stream
        self._check(self._cudart.cudaMemcpyAsync(self._ptrs[name], array.ctypes.data, array.nbytes, kind, target), "cudaMemcpyAsync")
        self._pending.append(array)

    def copy_within(self, dst: str, src: str, nbytes: int, *, stream: int | None = None) -> None:
        """Queue a device-to-device copy of `nbytes` from buffer `src` to buffer `dst`."""
        if nbytes > min(self.plans[dst].nbytes, self.plans[src].nbytes):
            raise InputError(f"{nbytes} bytes do not fit buffers {dst!r} and {src!r}")
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        target = self.stream if stream is None else stream
        self._check(self._cudart.cudaMemcpyAsync(self._ptrs[dst], self._ptrs[src], nbytes, kind, target), "cudaMemcpyAsync")

    def download(self, name: str, shape: Sequence[int], dtype: Any, *, stream: int | None = None) -> np.ndarray:
        """Queue a copy of buffer `name`'s first `shape` elements into a new array (valid once the stream
        is synchronized)."""
        out = np.empty(tuple(shape), dtype=dtype)
        if out.nbytes > self.plans[name].nbytes:
            raise InputError(f"{name!r}: shape {tuple(shape)} is larger than its buffer, planned for {self.plans[name].shape}")
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        target = self.stream if stream is None else stream
        self._check(self._cudart.cudaMemcpyAsync(out.ctypes.data, self._ptrs[name], out.nbytes, kind, target), "cudaMemcpyAsync")
        return out

    def synchronize(self) -> None:
        self._check(self._cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self._pending.clear()

    def close(self) -> None:
        """Free the buffers and destroy the stream (waits for queued work first)."""
        if self._stream is not None:
            self._cudart.cudaStreamSynchronize(self._stream)
        for ptr in self._ptrs.values():
            self._cudart.cudaFree(ptr)
        self._ptrs = {}
        if self._stream is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._pending.clear()

    def __enter__(self) -> DeviceBuffers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TensorRTEngine:
    """Runs one TensorRT or TensorRT-RTX engine: `engine({name: ndarray}) -> {name: ndarray}`.

    Args:
        path: the serialized engine (`BUNDLE/engines/<component>.<key>.engine`).
        inputs, outputs: the manifest's tensor specs; feeds are checked against them and the
            engine's profile.
        target: the library that built the engine, "tensorrt-rtx" or "tensorrt".
        device: the CUDA device ordinal.

    The engine owns device memory and a CUDA stream: use it as a context manager or call
    `close()`. Calls are synchronous and not thread-safe (one execution context).

    Host traffic when called with arrays: an input passed as the same ndarray object as in the
    previous call is not copied again (do not modify it in place between calls). The pipeline's
    flow-matching loop does not call it per step: it stages inputs, binds buffers across engines
    and enqueues (`stage`, `bind`, `enqueue`; runtime/backends/tensorrt/loop.py), so latents stay on the GPU.

    Raises:
        InputError: TensorRT or cuda-python is not installed.
        BundleError: the engine cannot be deserialized (another library version or GPU), or its
            tensors differ from the manifest's.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        *,
        target: str = "tensorrt-rtx",
        device: int = 0,
    ) -> None:
        from latentrt.engines.library import load_library, make_logger

        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.path = Path(path)
        self.target = target
        self.device = device
        self._buffers: DeviceBuffers | None = None
        library = load_library(target)  # type: ignore[arg-type]
        trt = library.module
        _set_device(device)
        self._logger = make_logger(library)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise BundleError(
                f"{library.module_name} {library.version} could not load engine {self.path}: "
                + ("; ".join(self._logger.errors) or "no error logged")
                + "; it was built by another library version or for another GPU: rebuild it with `latentrt build`"
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise LatentRTError(f"could not create an execution context for {self.path}: " + "; ".join(self._logger.errors))

        io_names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        engine_inputs = [n for n in io_names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        engine_outputs = [n for n in io_names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(engine_inputs) != sorted(s.name for s in self.inputs) or sorted(engine_outputs) != sorted(s.name for s in self.outputs):
            raise BundleError(
                f"engine {self.path} has inputs {engine_inputs} and outputs {engine_outputs}, the manifest "
                f"{[s.name for s in self.inputs]} and {[s.name for s in self.outputs]}; rebuild it with `latentrt build`"
            )
        self._dtypes = {s.name: s.dtype for s in (*self.inputs, *self.outputs)}
        for name in io_names:
            actual = library.dtype_name(self._engine.get_tensor_dtype(name))
            if actual != self._dtypes[name]:
                raise BundleError(f"engine {self.path}: tensor {name!r} is {actual}, the manifest says {self._dtypes[name]}; rebuild it")
        self.profile = {
            name: tuple(tuple(int(d) for d in s) for s in self._engine.get_tensor_profile_shape(name, 0)) for name in engine_inputs
        }

        # Largest outputs: what the engine infers at the profile's max input shapes.
        max_shapes: dict[str, tuple[int, ...]] = {}
        for name, (_, _, hi) in self.profile.items():
            self._context.set_input_shape(name, hi)
            max_shapes[name] = hi
        for name in engine_outputs:
            max_shapes[name] = tuple(int(d) for d in self._context.get_tensor_shape(name))
        self.plans = plan_buffers(max_shapes, self._dtypes)

        self._buffers = DeviceBuffers(self.plans, device=device)
        self._resident: dict[str, np.ndarray] = {}  # the host array each input buffer last received
        for name in self.plans:
            self._context.set_tensor_address(name, self._buffers.address(name))
        log.debug("%s: %d MiB of device buffers", self.path.name, sum(p.nbytes for p in self.plans.values()) >> 20)

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.stage(feeds)
        self.enqueue()
        buffers = self.buffers
        results = {spec.name: buffers.download(spec.name, self.output_shape(spec.name), numpy_dtype(spec.dtype)) for spec in self.outputs}
        buffers.synchronize()
        return results

    @property
    def buffers(self) -> DeviceBuffers:
        if self._buffers is None:
            raise LatentRTError(f"engine {self.path} is closed")
        return self._buffers

    def stage(self, feeds: Mapping[str, np.ndarray | OnDevice], *, stream: int | None = None) -> None:
        """Set every input's shape and queue the upload of each array that is not on the device yet.

        `OnDevice(shape)` in place of an array means the input's data is already on the device: in
        its own buffer, or in another engine's buffer bound with `bind`.
        """
        shapes = {n: tuple(v.shape) for n, v in feeds.items()}
        for spec in self.inputs:
            value = feeds.get(spec.name)
            if isinstance(value, np.ndarray) and value.dtype != numpy_dtype(spec.dtype):
                raise InputError(f"input {spec.name!r} has dtype {value.dtype}, expected {spec.dtype}")
        check_feed_shapes(shapes, self.profile)
        buffers = self.buffers
        for spec in self.inputs:
            value = feeds[spec.name]
            same = tuple(self._context.get_tensor_shape(spec.name)) == shapes[spec.name]  # a re-set shape may count as a change
            if not same and not self._context.set_input_shape(spec.name, shapes[spec.name]):
                raise InputError(f"the engine rejected input {spec.name!r} of shape {shapes[spec.name]}: " + "; ".join(self._logger.errors))
            if isinstance(value, np.ndarray) and self._resident.get(spec.name) is not value:
                buffers.upload(spec.name, value, stream=stream)
                self._resident[spec.name] = value
            elif not isinstance(value, np.ndarray):
                self._resident.pop(spec.name, None)

    def enqueue(self, stream: int | None = None) -> None:
        """Queue one execution with the staged shapes (on `stream`, by default the engine's)."""
        if not self._context.execute_async_v3(self.buffers.stream if stream is None else stream):
            raise LatentRTError(f"engine {self.path} failed to execute: " + "; ".join(self._logger.errors))

    def address(self, name: str) -> int:
        """The device address tensor `name` is bound to."""
        return int(self._context.get_tensor_address(name))

    def bind(self, name: str, address: int) -> None:
        """Bind tensor `name` to device memory owned elsewhere (another engine's buffer), sized for
        this engine's largest shape of it."""
        if not self._context.set_tensor_address(name, address):
            raise LatentRTError(f"engine {self.path} refused the address for {name!r}: " + "; ".join(self._logger.errors))
        self._resident.pop(name, None)

    def forget(self, name: str) -> None:
        """Input `name`'s buffer was written on the device: the next array passed for it is uploaded."""
        self._resident.pop(name, None)

    def device_loop(self, latent_input: str, velocity_output: str):
        """A `DeviceDenoiser` that runs every flow-matching step of a call on the GPU (loop.py)."""
        from latentrt.runtime.backends.tensorrt.loop import DeviceDenoiser

        return DeviceDenoiser(self, latent_input, velocity_output)

    def output_shape(self, name: str) -> tuple[int, ...]:
        """`name`'s shape for the staged input shapes."""
        return tuple(int(d) for d in self._context.get_tensor_shape(name))

    def close(self) -> None:
        """Free the device buffers and the stream; the engine cannot be called afterwards."""
        buffers = getattr(self, "_buffers", None)
        if buffers is not None:
            buffers.close()
            self._buffers = None
        self._context = None
        self._engine = None

    def __enter__(self) -> TensorRTEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown; nothing to report to
            pass


def _set_device(device: int) -> None:
    from latentrt.engines.library import cuda_check, load_cudart

    cuda_check(load_cudart().cudaSetDevice(device), "cudaSetDevice")


def load_engines(bundle: str | os.PathLike, manifest: Manifest, options: BackendOptions = BackendOptions()) -> dict[str, TensorRTEngine]:
    """One `TensorRTEngine` per component, from the engines `latentrt build` wrote into the bundle (on `options.device`).

    For each component the newest intact engine built from the manifest's present ONNX file is used,
    with the library recorded in its metadata.

    Raises:
        BundleError: a component has no current engine (the message says how to build one).
    """
    from latentrt.engines.library import current_compute_capability

    device = options.device
    for name in manifest.components:  # a missing engine is reported before any CUDA call
        select_engine(bundle, manifest, name)
    cc = current_compute_capability(device)
    records = {name: select_engine(bundle, manifest, name, compute_capability=cc) for name in manifest.components}
    engines = {}
    try:
        for name, record in records.items():
            comp = manifest.components[name]
            engines[name] = TensorRTEngine(
                Path(bundle) / record.engine_file, comp.inputs, comp.outputs, target=record.spec.library, device=device
            )
    except BaseException:
        for engine in engines.values():
            engine.close()
        raise
    return engines

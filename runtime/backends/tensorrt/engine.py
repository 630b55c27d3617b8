"""TensorRT backend: deserialized engines behind the engine contract, sharing one GPU's resources.

`load_engines(bundle, manifest)` gives one `TensorRTComponent` per component. It holds every engine
of that component that can run here (`latentrt.engines.select`: library installed, same version,
the GPU among its targets), best first, and sends each call to the first whose optimization profile
contains the call's shapes, so engines built for several resolutions coexist. When no engine can
run, the error lists every engine and why it was not chosen.

Each `TensorRTEngine` is one deserialized engine:

- its execution context runs on **user-managed memory**: scratch memory comes from the pipeline's
  shared activation buffer (`device.DeviceResources`), sized for the shapes of each call
  (`update_device_memory_size_for_shapes`), never for the profile's maximum per engine;
- its input/output buffers are allocated for the shapes asked for and grown on demand;
- inputs are copied in, `execute_async_v3` runs on the pipeline's stream, outputs are copied back;
- TensorRT-RTX's runtime (JIT) cache is read from and written next to the engine
  (`<engine>.sm89.runtime-cache`), so the second start of a process skips the compilation;
- refittable engines take new weights with `refit({name: array})` (LoRA), weight-stripped ones are
  refitted from the bundle's ONNX at load.

Thread safety: an engine, and all engines of one pipeline, share one lock; a call holds it from its
first upload to its last download, so concurrent calls from several threads run one after the
other (correctly), and each call makes the pipeline's GPU current in its own thread first.

The device-free parts (shape resolution, buffer planning, feed checks, engine choice) are plain
functions tested without a GPU. TensorRT and cuda-python are imported only when an engine is created.

Example:
    >>> engines = load_engines("bundles/sd3", load_manifest("bundles/sd3"))  # doctest: +SKIP
    >>> engines["vae_decoder"]({"latent_sample": latents})["sample"].shape  # doctest: +SKIP
    (1, 3, 1024, 1024)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from latentrt.bundle.manifest import Manifest, TensorSpec
from latentrt.engines.memory import DTYPE_ITEMSIZE, EngineMemory, aligned, format_bytes, pipeline_memory, tensor_nbytes
from latentrt.errors import BundleError, InputError, LatentRTError
from latentrt.runtime.backends.tensorrt.device import BufferPlan, DeviceBuffers, DeviceResources, plan_buffers
from latentrt.runtime.engine import BackendOptions, OnDevice

__all__ = [
    "DTYPE_ITEMSIZE",
    "BufferPlan",
    "DeviceBuffers",
    "DeviceResources",
    "TensorRTComponent",
    "TensorRTEngine",
    "check_feed_shapes",
    "load_engines",
    "numpy_dtype",
    "plan_buffers",
    "resolve_shape",
    "select_engine",
    "tensor_nbytes",
]

log = logging.getLogger(__name__)


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


def usable_engines(
    bundle: str | os.PathLike,
    manifest: Manifest,
    component: str,
    *,
    compute_capability: str | None = None,
    installed: Mapping[str, str | None] | None = None,
    statuses: Sequence[Any] | None = None,
) -> list[Any]:
    """The engine records of `component` that can run here, best first (see `latentrt.engines.select`).

    Raises:
        BundleError: none can; the message lists every engine of the component and why it was not
            chosen, and how to build one that fits.
    """
    from latentrt.engines.cache import list_engines
    from latentrt.engines.library import TARGETS, installed_version
    from latentrt.engines.select import choose_engines

    statuses = list_engines(bundle, manifest) if statuses is None else statuses
    mine = [s for s in statuses if s.component == component]
    current = [s.record for s in mine if s.status == "current"]
    installed = {t: installed_version(t) for t in TARGETS} if installed is None else installed  # type: ignore[arg-type]
    usable, rejected = choose_engines(current, installed=installed, compute_capability=compute_capability)
    if usable:
        for r in rejected:
            log.info("%s: not using %s: %s", component, r.record.engine_file, r.reason)
        return usable
    why = [f"{r.record.engine_file}: {r.reason}" for r in rejected]
    why += [f"{s.path.name}: stale ({'; '.join(s.reasons)})" for s in mine if s.status == "stale"]
    raise BundleError(
        f"{bundle}: no TensorRT engine for component {component!r} can run here"
        + (f" (GPU compute capability {compute_capability})" if compute_capability else "")
        + (":\n  - " + "\n  - ".join(why) + "\n" if why else "; ")
        + f"build one with `latentrt build {bundle}`"
    )


def select_engine(
    bundle: str | os.PathLike,
    manifest: Manifest,
    component: str,
    *,
    compute_capability: str | None = None,
    installed: Mapping[str, str | None] | None = None,
) -> Any:
    """The best engine record to run `component` here (see `usable_engines`).

    Raises:
        BundleError: no engine can run here (the message says why for each, and how to build one).
    """
    return usable_engines(bundle, manifest, component, compute_capability=compute_capability, installed=installed)[0]


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


class TensorRTEngine:
    """Runs one TensorRT or TensorRT-RTX engine: `engine({name: ndarray}) -> {name: ndarray}`.

    Args:
        path: the serialized engine (`BUNDLE/engines/<component>.<key>.engine`).
        inputs, outputs: the manifest's tensor specs; feeds are checked against them and the
            engine's profile.
        target: the library that built the engine, "tensorrt-rtx" or "tensorrt".
        device: the CUDA device ordinal (when `resources` is not given).
        resources: the GPU resources shared with the pipeline's other engines (stream, activation
            buffer, lock); by default the engine's own.
        record: the engine's metadata (`EngineRecord`): its weights mode, refittable weights and
            the builder's memory totals.
        onnx_path: the component's ONNX file: the weights of a weight-stripped engine, and of a
            refit's weights that TensorRT needs along with the new ones.
        runtime_cache: TensorRT-RTX's runtime cache file for this engine on this GPU kind (read if
            present, written after the first call and on `close()`).

    The engine owns device memory: use it as a context manager or call `close()`.

    Host traffic when called with arrays: an input passed as the same ndarray object as in the
    previous call is not copied again (do not modify it in place between calls). The pipeline's
    flow-matching loop does not call it per step: it stages inputs, binds buffers across engines
    and enqueues (`stage`, `bind`, `enqueue`; runtime/backends/tensorrt/loop.py), so latents stay on the GPU.

    Raises:
        InputError: TensorRT or cuda-python is not installed.
        BundleError: the engine cannot be deserialized (another library version or GPU), its
            tensors differ from the manifest's, or it reads an input on the host (a shape tensor).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        *,
        target: str = "tensorrt-rtx",
        device: int = 0,
        resources: DeviceResources | None = None,
        record: Any = None,
        onnx_path: str | os.PathLike | None = None,
        runtime_cache: str | os.PathLike | None = None,
    ) -> None:
        from latentrt.engines.library import load_library, make_logger

        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.path = Path(path)
        self.target = target
        self.record = record
        self.onnx_path = Path(onnx_path) if onnx_path is not None else None
        self.runtime_cache_path = Path(runtime_cache) if runtime_cache is not None else None
        self._buffers: DeviceBuffers | None = None
        self._context = self._engine = self._runtime = self._runtime_config = self._runtime_cache = None
        self._refitted: dict[str, np.ndarray] = {}
        self._calls = 0
        self._shapes: dict[str, tuple[int, ...]] = {}  # the input shapes set on the context
        self._arena: tuple[int, int, int] | None = None  # (generation, pointer, size) set on the context
        self._need = 0  # activation bytes for those shapes
        self._bound: dict[str, int] = {}  # tensors bound to memory owned elsewhere (`bind`)
        self._bound_set = False  # every tensor address set on the present context
        self._resident: dict[str, np.ndarray] = {}  # the host array each input buffer last received
        self.graph_mode = "capture"  # "capture": the loop may capture it; "library": TensorRT-RTX captures itself
        library = load_library(target)  # type: ignore[arg-type]
        self._library = library
        self._trt = trt = library.module
        self.resources = (resources or DeviceResources(device)).retain()
        self.device = self.resources.device
        try:
            with self.resources.lock:
                self.resources.activate()
                self._logger = make_logger(library)
                self._logger.clear()
                self._runtime = trt.Runtime(self._logger)
                data = self.path.read_bytes()
                self._engine = self._runtime.deserialize_cuda_engine(data)
                if self._engine is None:
                    raise BundleError(
                        f"{library.module_name} {library.version} could not load engine {self.path}: "
                        + ("; ".join(self._validity(data) + self._logger.errors) or "no error logged")
                        + "; it was built by another library version or for another GPU: rebuild it with `latentrt build`"
                    )
                del data
                self._check_tensors()
                if self.weights_mode == "stripped":
                    self.refit_from_bundle()
                self._create_context(library_graphs=False)
                self._buffers = DeviceBuffers({}, dtypes=self._dtypes, resources=self.resources)
                self.memory = self._measure_memory()
        except BaseException:
            self.close()
            raise
        log.info(
            "%s: weights %s, activations %s at the profile's max (shared), I/O %s at the profile's max (allocated as needed)",
            self.path.name, format_bytes(self.memory.weights), format_bytes(self.memory.activations), format_bytes(self.memory.io),
        )

    # -- loading ----------------------------------------------------------------------------------

    def _validity(self, data: bytes) -> list[str]:
        """TensorRT-RTX's reasons why a plan cannot load here (version, compute capability, driver)."""
        check = getattr(self._runtime, "get_engine_validity", None)
        if check is None:
            return []
        try:
            validity, diagnostics = check(data)
        except Exception:  # noqa: BLE001 - a diagnostic only
            return []
        if getattr(validity, "name", "") == "VALID":
            return []
        flags = self._trt.EngineInvalidityDiagnostics
        found = [m for m, v in flags.__members__.items() if int(diagnostics) & int(v)]
        return [f"engine validity {getattr(validity, 'name', validity)}: {', '.join(found) or 'no diagnostic'}"]

    def _check_tensors(self) -> None:
        trt, engine = self._trt, self._engine
        io_names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._engine_inputs = [n for n in io_names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        engine_outputs = [n for n in io_names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(self._engine_inputs) != sorted(s.name for s in self.inputs) or sorted(engine_outputs) != sorted(s.name for s in self.outputs):
            raise BundleError(
                f"engine {self.path} has inputs {self._engine_inputs} and outputs {engine_outputs}, the manifest "
                f"{[s.name for s in self.inputs]} and {[s.name for s in self.outputs]}; rebuild it with `latentrt build`"
            )
        on_host = [n for n in io_names if engine.get_tensor_location(n) == trt.TensorLocation.HOST]
        if on_host:
            raise BundleError(
                f"engine {self.path}: tensor(s) {on_host} are read or written on the host (shape tensors): latentrt binds device "
                "memory only. Re-export the component so that these inputs feed no shape computation (make those dimensions "
                "come from the data tensors' shapes), then rebuild the engine"
            )
        self._dtypes = {s.name: s.dtype for s in (*self.inputs, *self.outputs)}
        for name in io_names:
            actual = self._library.dtype_name(engine.get_tensor_dtype(name))
            if actual != self._dtypes[name]:
                raise BundleError(f"engine {self.path}: tensor {name!r} is {actual}, the manifest says {self._dtypes[name]}; rebuild it")
        self.profile = {
            name: tuple(tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(name, 0)) for name in self._engine_inputs
        }

    def _create_context(self, *, library_graphs: bool) -> None:
        """An execution context on user-managed memory (and, with TensorRT-RTX, its runtime cache
        and, if asked, its own CUDA graphs)."""
        trt, engine = self._trt, self._engine
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self._context = None
        self._logger.clear()
        if hasattr(engine, "create_runtime_config"):
            config = engine.create_runtime_config()
            config.set_execution_context_allocation_strategy(strategy)
            if self._runtime_cache is None and hasattr(config, "create_runtime_cache"):
                self._runtime_cache = self._load_runtime_cache(config)
            if self._runtime_cache is not None:
                config.set_runtime_cache(self._runtime_cache)
            if library_graphs and hasattr(config, "cuda_graph_strategy"):
                config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            self._runtime_config = config
            self._context = engine.create_execution_context(config)
        else:
            self._context = engine.create_execution_context(strategy)
        if self._context is None:
            raise LatentRTError(f"could not create an execution context for {self.path}: " + "; ".join(self._logger.errors))
        self._shapes, self._arena, self._bound_set = {}, None, False

    def _load_runtime_cache(self, config: Any) -> Any:
        cache = config.create_runtime_cache()
        path = self.runtime_cache_path
        if path is not None and path.is_file():
            if cache.deserialize(path.read_bytes()):
                log.info("%s: runtime cache %s loaded", self.path.name, path.name)
            else:
                log.info("%s: runtime cache %s is from another GPU, driver or library version; starting a new one", self.path.name, path.name)
        return cache

    def save_runtime_cache(self) -> Path | None:
        """Write TensorRT-RTX's runtime cache next to the engine (with the bundle's permissions); the
        path written, or None (no cache, no path, or a read-only bundle: logged)."""
        if self._runtime_cache is None or self.runtime_cache_path is None:
            return None
        from latentrt.engines.cache import write_bundle_file

        path = self.runtime_cache_path
        try:
            data = self._runtime_cache.serialize()
            write_bundle_file(path.parents[1], path, data)
        except OSError as err:
            log.warning("%s: could not write the runtime cache %s (%s); the next start compiles again", self.path.name, path, err)
            return None
        return path

    def _measure_memory(self) -> EngineMemory:
        """Weights (the builder's total, else the engine file's size), activations and I/O at the profile's max."""
        engine, context = self._engine, self._context
        if hasattr(engine, "device_memory_size_v2"):
            activations = int(engine.device_memory_size_v2)
        else:
            activations = int(engine.device_memory_size)
        for name, (_, _, hi) in self.profile.items():
            context.set_input_shape(name, hi)
        io = 0
        for spec in (*self.inputs, *self.outputs):
            io += aligned(tensor_nbytes(tuple(int(d) for d in context.get_tensor_shape(spec.name)), spec.dtype))
        recorded = (self.record.memory if self.record is not None else {}) or {}
        weights = recorded.get("weights")
        if weights is None:
            weights = self.path.stat().st_size
        self._shapes = {}
        return EngineMemory(weights=int(weights) + int(recorded.get("device_persistent") or 0), activations=activations, io=io, source="engine")

    # -- properties -------------------------------------------------------------------------------

    @property
    def weights_mode(self) -> str:
        return self.record.weights_mode if self.record is not None else "embedded"

    @property
    def buffers(self) -> DeviceBuffers:
        if self._buffers is None:
            raise LatentRTError(f"engine {self.path} is closed")
        return self._buffers

    @property
    def max_batch(self) -> int | None:
        """The largest batch the profile takes (the first dimension of the inputs), None without one."""
        sizes = [hi[0] for (_, _, hi) in self.profile.values() if hi]
        return min(sizes) if sizes else None

    # -- running ----------------------------------------------------------------------------------

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.resources.lock:
            self.resources.activate()
            self.stage(feeds)
            self.enqueue()
            buffers = self.buffers
            results = {spec.name: buffers.download(spec.name, self.output_shape(spec.name), numpy_dtype(spec.dtype)) for spec in self.outputs}
            buffers.synchronize()
            self.after_call()
            return results

    def after_call(self) -> None:
        """Bookkeeping after a completed call: the runtime cache is written after the first one."""
        self._calls += 1
        if self._calls == 1:
            self.save_runtime_cache()

    def stage(self, feeds: Mapping[str, np.ndarray | OnDevice], *, stream: int | None = None, pinned: DeviceResources | None = None) -> None:
        """Set every input's shape, give the context its activation memory and buffers for these
        shapes, and queue the upload of each array that is not on the device yet.

        `OnDevice(shape)` in place of an array means the input's data is already on the device: in
        its own buffer, or in another engine's buffer bound with `bind`. With `pinned`, arrays are
        uploaded through its pinned memory (the copy does not wait for the stream).
        """
        shapes = {n: tuple(v.shape) for n, v in feeds.items()}
        for spec in self.inputs:
            value = feeds.get(spec.name)
            if isinstance(value, np.ndarray) and value.dtype != numpy_dtype(spec.dtype):
                raise InputError(f"input {spec.name!r} has dtype {value.dtype}, expected {spec.dtype}")
        check_feed_shapes(shapes, self.profile)
        context, buffers = self._context, self.buffers
        changed = False
        for spec in self.inputs:
            shape = shapes[spec.name]
            if self._shapes.get(spec.name) != shape:
                self._logger.clear()
                if not context.set_input_shape(spec.name, shape):
                    raise InputError(f"the engine rejected input {spec.name!r} of shape {shape}: " + "; ".join(self._logger.errors))
                self._shapes[spec.name] = shape
                changed = True
        if changed or self._arena is None:
            self._need = self._activation_need()
        self._bind_activations()
        for spec in (*self.inputs, *self.outputs):
            if spec.name in self._bound:
                continue
            shape = shapes[spec.name] if spec.name in shapes else self.output_shape(spec.name)
            if buffers.ensure(spec.name, tensor_nbytes(shape, spec.dtype), shape=shape) or not self._bound_set:
                context.set_tensor_address(spec.name, buffers.address(spec.name))
                self._resident.pop(spec.name, None)
        for name, address in self._bound.items():
            context.set_tensor_address(name, address)
        self._bound_set = True
        for spec in self.inputs:
            value = feeds[spec.name]
            if isinstance(value, np.ndarray) and self._resident.get(spec.name) is not value:
                buffers.upload(spec.name, pinned.pinned_copy(value) if pinned is not None else value, stream=stream)
                self._resident[spec.name] = value
            elif not isinstance(value, np.ndarray):
                self._resident.pop(spec.name, None)

    def _activation_need(self) -> int:
        """Scratch bytes for the shapes set on the context (the profile's max where the library cannot tell)."""
        update = getattr(self._context, "update_device_memory_size_for_shapes", None)
        if update is not None:
            return int(update())
        return int(getattr(self._engine, "device_memory_size_v2", None) or self._engine.device_memory_size)

    def _bind_activations(self) -> None:
        ptr, size = self.resources.activation(self._need)
        key = (self.resources.arena_generation, ptr, size)
        if self._arena != key:
            if hasattr(self._context, "set_device_memory"):
                self._context.set_device_memory(ptr, size)
            else:  # TensorRT 10.0
                self._context.device_memory = ptr
            self._arena = key

    def enqueue(self, stream: int | None = None) -> None:
        """Queue one execution with the staged shapes (on `stream`, by default the pipeline's)."""
        self._logger.clear()
        if not self._context.execute_async_v3(self.resources.stream if stream is None else stream):
            raise LatentRTError(f"engine {self.path} failed to execute: " + "; ".join(self._logger.errors or ["no error logged"]))

    def is_stream_capturable(self, stream: int) -> bool | None:
        """TensorRT-RTX's answer whether this context's work can be captured into a CUDA graph on
        `stream` (None where the library cannot tell: NVIDIA TensorRT)."""
        check = getattr(self._context, "is_stream_capturable", None)
        return None if check is None else bool(check(stream))

    def use_library_graphs(self) -> bool:
        """Let TensorRT-RTX capture and replay this engine's work itself (its CUDA graph strategy
        WHOLE_GRAPH_CAPTURE), for contexts that cannot be stream-captured; False where unsupported."""
        if self.graph_mode == "library":
            return True
        if not hasattr(self._trt, "CudaGraphStrategy") or not hasattr(self._engine, "create_runtime_config"):
            return False
        with self.resources.lock:
            self.resources.synchronize()
            bound = dict(self._bound)
            self._create_context(library_graphs=True)
            self._bound = bound
            self.graph_mode = "library"
        return True

    def address(self, name: str) -> int:
        """The device address tensor `name` is bound to (after `stage`)."""
        return int(self._context.get_tensor_address(name))

    def capacity(self, name: str) -> int:
        """Bytes of the engine's own buffer for `name` (0 when bound elsewhere or not allocated yet)."""
        return 0 if name in self._bound else self.buffers.capacity(name)

    def bind(self, name: str, address: int) -> None:
        """Bind tensor `name` to device memory owned elsewhere (another engine's buffer); the caller
        makes sure it holds this engine's shape of it."""
        self._logger.clear()
        if not self._context.set_tensor_address(name, address):
            raise LatentRTError(f"engine {self.path} refused the address for {name!r}: " + "; ".join(self._logger.errors))
        self._bound[name] = address
        self._resident.pop(name, None)

    def forget(self, name: str) -> None:
        """Input `name`'s buffer was written on the device: the next array passed for it is uploaded."""
        self._resident.pop(name, None)

    def is_resident(self, name: str, value: Any) -> bool:
        return self._resident.get(name) is value

    def device_loop(self, latent_input: str, velocity_output: str):
        """A `DeviceDenoiser` that runs every flow-matching step of a call on the GPU (loop.py)."""
        from latentrt.runtime.backends.tensorrt.loop import DeviceDenoiser

        return DeviceDenoiser(self, latent_input, velocity_output)

    def output_shape(self, name: str) -> tuple[int, ...]:
        """`name`'s shape for the staged input shapes."""
        return tuple(int(d) for d in self._context.get_tensor_shape(name))

    # -- refit ------------------------------------------------------------------------------------

    @property
    def refittable(self) -> bool:
        return bool(getattr(self._engine, "refittable", False))

    def refit(self, weights: Mapping[str, np.ndarray]) -> list[str]:
        """Replace some of the engine's weights (initializer name -> array) without a rebuild.

        Each array must name one of the component's ONNX initializers that the engine holds as
        weights, have its shape and be finite; it is converted to the initializer's dtype. TensorRT
        may need other weights along with them (fused at build time): those come from the bundle's
        ONNX, or from an earlier refit. Returns the names of the weights set.

        Raises:
            InputError: the engine was built with weights embedded, or a weight is wrong (all listed).
            LatentRTError: TensorRT rejected the refit.
        """
        from latentrt.runtime.backends.tensorrt.refit import prepare_refit, refit_engine

        if not self.refittable:
            raise InputError(f"engine {self.path} was built with its weights embedded; rebuild it with `latentrt build --weights refittable`")
        if self.onnx_path is None:
            raise InputError(f"engine {self.path}: refitting needs the component's ONNX file (onnx_path)")
        held = (self.record.refit or {}).get("weights") if self.record is not None else None
        plan = prepare_refit(self.onnx_path, weights, refittable=held)
        with self.resources.lock:
            self.resources.activate()
            self.resources.synchronize()  # no work in flight while weights change
            done = refit_engine(self._trt, self._engine, self._logger, self.onnx_path, plan)
        self._refitted.update(plan)
        return done

    def refit_from_bundle(self) -> list[str]:
        """Set every weight from the bundle's ONNX file (TensorRT's ONNX refitter): loads a
        weight-stripped engine, or undoes earlier `refit` calls."""
        from latentrt.runtime.backends.tensorrt.refit import refit_engine

        if self.onnx_path is None:
            raise InputError(f"engine {self.path}: refitting needs the component's ONNX file (onnx_path)")
        with self.resources.lock:
            self.resources.activate()
            self.resources.synchronize()
            done = refit_engine(self._trt, self._engine, self._logger, self.onnx_path, [], from_onnx=True)
        self._refitted.clear()
        return done

    # -- cleanup ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the engine's buffers and its share of the GPU resources; it cannot be called afterwards.

        TensorRT-RTX's runtime cache is written first when calls were made since it was loaded.
        """
        resources = getattr(self, "resources", None)
        if resources is None:
            return
        with resources.lock:
            if not resources.closed:
                resources.activate()
                resources.synchronize()
                if getattr(self, "_calls", 0):
                    self.save_runtime_cache()
            self._context = None  # before the memory it runs on
            self._runtime_config = None
            self._runtime_cache = None
            self._engine = None
            self._runtime = None
            if self._buffers is not None:
                self._buffers.close()
                self._buffers = None
            self.resources = None  # type: ignore[assignment]
            resources.release()

    def __enter__(self) -> TensorRTEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TensorRTComponent:
    """A component's usable engines behind one engine contract; each call goes to the first engine
    (in preference order) whose profile contains the call's input shapes.

    Engines are deserialized when first needed (the preferred one at once, so a broken engine shows
    at load); those loaded stay loaded until `close()`. `refit` applies to every engine of the
    component, including those loaded later.
    """

    def __init__(self, bundle: Path, name: str, manifest: Manifest, records: Sequence[Any], resources: DeviceResources) -> None:
        comp = manifest.components[name]
        self.name = name
        self.bundle = bundle
        self.inputs, self.outputs = tuple(comp.inputs), tuple(comp.outputs)
        self.records = list(records)
        self.resources = resources.retain()
        self._onnx_path = bundle / comp.file
        self._engines: dict[str, TensorRTEngine] = {}
        self._loops: dict[tuple[str, str, str], Any] = {}
        self._refit: dict[str, np.ndarray] = {}
        self._base: dict[str, np.ndarray] = {}  # bundle values of weights a refit changed (to restore them)
        try:
            self.engine_for_record(self.records[0])
        except BaseException:
            self.close()
            raise

    def engine_for_record(self, record: Any) -> TensorRTEngine:
        engine = self._engines.get(record.key)
        if engine is None:
            from latentrt.engines.cache import runtime_cache_path

            cache = runtime_cache_path(self.bundle, record, self._gpu) if record.spec.library == "tensorrt-rtx" else None
            engine = TensorRTEngine(
                self.bundle / record.engine_file, self.inputs, self.outputs, target=record.spec.library,
                resources=self.resources, record=record, onnx_path=self._onnx_path, runtime_cache=cache,
            )
            if self._refit:
                engine.refit(self._refit)
            self._engines[record.key] = engine
        return engine

    @property
    def _gpu(self) -> str:
        from latentrt.engines.library import current_compute_capability

        return current_compute_capability(self.resources.device)

    def engine_for(self, shapes: Mapping[str, Sequence[int]]) -> TensorRTEngine:
        """The engine that serves a call with these input shapes.

        Raises:
            InputError: no engine's profile contains them; the message lists each engine's profile.
        """
        from latentrt.engines.select import describe_profile, pick

        record = pick(self.records, shapes)
        if record is None:
            asked = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in shapes.items())
            profiles = "\n  - ".join(f"{r.engine_file}: {describe_profile(r)}" for r in self.records)
            raise InputError(
                f"{self.name}: no engine's profile contains this call ({asked}); the engines take:\n  - {profiles}\n"
                "build one for these sizes with `latentrt build --size ... --batch ...` (engines for several sizes coexist)"
            )
        return self.engine_for_record(record)

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.engine_for({n: v.shape for n, v in feeds.items()})(feeds)

    @property
    def max_batch(self) -> int | None:
        """The largest batch any of the component's engines takes."""
        from latentrt.engines.select import max_batch

        return max_batch(self.records)

    @property
    def loaded(self) -> list[TensorRTEngine]:
        return list(self._engines.values())

    def device_loop(self, latent_input: str, velocity_output: str):
        """A device loop that runs each call on the engine whose profile fits it (loop.py)."""
        from latentrt.runtime.backends.tensorrt.loop import ComponentDeviceLoop

        return ComponentDeviceLoop(self, latent_input, velocity_output)

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Run with the bundle's weights except `weights` (LoRA; the engine protocol's `set_weights`):
        every engine of the component is refitted with these and, for initializers changed before
        and not now, the bundle's values; `{}` refits everything from the bundle's ONNX (exact).
        Engines loaded later get the same weights.

        Raises:
            InputError: an engine built without `--weights refittable`, or a weight that does not fit.
            LatentRTError: TensorRT rejected the refit.
        """
        from latentrt.runtime.backends.tensorrt.refit import set_weights_values

        values = set_weights_values(self._onnx_path, self._refit, weights, base=self._base)
        for engine in self._engines.values():
            if values is None:
                engine.refit_from_bundle()
            else:
                engine.refit(values)
        self._refit = dict(weights)

    def refit(self, weights: Mapping[str, np.ndarray]) -> list[str]:
        """`TensorRTEngine.refit` on every engine of the component (and those loaded later)."""
        done: list[str] = []
        for engine in self._engines.values():
            done = engine.refit(weights)
        self._refit.update(weights)
        return done

    def close(self) -> None:
        for loop in self._loops.values():
            loop.close()
        self._loops.clear()
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
        if self.resources is not None:
            resources, self.resources = self.resources, None
            resources.release()

    def __enter__(self) -> TensorRTComponent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_engines(bundle: str | os.PathLike, manifest: Manifest, options: BackendOptions = BackendOptions()) -> dict[str, TensorRTComponent]:
    """One `TensorRTComponent` per component of `manifest`, from the engines `latentrt build` wrote.

    All components share one `DeviceResources` on `options.device` (stream, activation buffer, lock).
    The memory they need at their profiles' max is logged (INFO), per engine and in total.

    Raises:
        BundleError: a component has no engine that can run here (the message lists every engine
            and why it was not chosen); raised before any CUDA call when a component has none at all.
    """
    from latentrt.engines.cache import list_engines
    from latentrt.engines.library import TARGETS, installed_version, visible_compute_capability

    bundle = Path(bundle)
    statuses = list_engines(bundle, manifest)
    installed = {t: installed_version(t) for t in TARGETS}
    for name in manifest.components:  # a missing or unloadable engine is reported before any CUDA call
        usable_engines(bundle, manifest, name, installed=installed, statuses=statuses)
    cc = visible_compute_capability(options.device)
    if cc is None:
        raise LatentRTError(
            f"the TensorRT backend needs a CUDA GPU (device {options.device}) and cuda-python; none is usable here "
            "(pip install cuda-python, check the NVIDIA driver), or load the bundle with backend='onnxruntime'"
        )
    records = {name: usable_engines(bundle, manifest, name, compute_capability=cc, installed=installed, statuses=statuses) for name in manifest.components}
    resources = DeviceResources(options.device).retain()
    components: dict[str, TensorRTComponent] = {}
    try:
        for name, recs in records.items():
            components[name] = TensorRTComponent(bundle, name, manifest, recs, resources)
    except BaseException:
        for component in components.values():
            component.close()
        raise
    finally:
        resources.release()
    need = pipeline_memory({name: c.loaded[0].memory for name, c in components.items()})
    log.info(
        "%s: the engines need %s of GPU memory at their profiles' max: weights %s, one shared activation buffer %s "
        "(%s if every engine had its own), I/O %s",
        bundle, format_bytes(need.total), format_bytes(need.weights), format_bytes(need.activations),
        format_bytes(need.activations_if_not_shared), format_bytes(need.io),
    )
    return components

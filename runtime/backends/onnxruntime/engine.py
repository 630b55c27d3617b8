"""ONNX Runtime backend: one `InferenceSession` per component behind the engine contract."""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from latentrt.errors import BundleError, InputError
from latentrt.bundle.manifest import Manifest, TensorSpec
from latentrt.runtime.engine import BackendOptions, check_feeds
from latentrt.runtime.backends.cpu import cpu_info
from latentrt.runtime.backends.onnxruntime.fusions import rewrite_model, rewritten_for_onnx_runtime



@functools.cache
def _shared_cpu_arena() -> None:
    """Register one CPU arena with ONNX Runtime's process environment for every session to share.

    Each session otherwise grows its own arena to its largest run and keeps it: a pipeline's peak
    memory is then the sum of its components' working sets, not the largest one (bench-sd3:
    310 -> 253 MB peak RSS). The arena grows by what is requested, not in powers of two. ONNX Runtime
    allows one registration per process, hence the cache.
    """
    import onnxruntime as ort

    memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(memory, ort.OrtArenaCfg({"arena_extend_strategy": 1}))


class OnnxRuntimeEngine:
    """Runs one ONNX model: `engine({name: ndarray}) -> {name: ndarray}`.

    Calls may come from several threads at once (`InferenceSession.run` is thread-safe), hence
    `concurrent_calls = True` for the pipeline.

    Args:
        path: the .onnx file (external data next to it is found by ONNX Runtime).
        inputs, outputs: the manifest's tensor specs; feeds are checked against them.
        providers: ONNX Runtime execution providers, CPU by default.
        threads: intra-op threads (0 lets ONNX Runtime choose: one per physical core).
    """

    concurrent_calls = True

    def __init__(
        self,
        path: str | os.PathLike,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int = 0,
    ) -> None:
        import onnxruntime as ort

        self.path = os.fspath(path)
        self.providers = tuple(providers)
        self.threads = threads
        options, saturating = self._session_options()
        cpu = "CPUExecutionProvider" in providers
        # ONNX Runtime may map the copy's data file: on Linux it can go at once, elsewhere it may have to wait.
        with tempfile.TemporaryDirectory(prefix="latentrt-", ignore_cleanup_errors=True) as scratch:
            try:
                rewritten = rewritten_for_onnx_runtime(path, scratch, unsigned_weights=saturating) if cpu else None
                self._session = ort.InferenceSession(str(rewritten or path), options, providers=list(providers))
            except Exception as err:  # onnxruntime raises its own exception types
                raise BundleError(f"ONNX Runtime could not load {path}: {err}") from err
        self._weights: _InMemoryWeights | None = None  # built by the first set_weights
        self._kept: list = []  # the OrtValues the present session reads its weights from
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self._output_names = [o.name for o in self.outputs]

    def _session_options(self):
        """Session options for this engine, and whether the CPU's u8 x s8 GEMM saturates."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.intra_op_num_threads = self.threads
        # Worker threads spin between the ops of a run (waking a sleeping worker per op cost the
        # bench-sd3 denoiser 62 -> 68 ms a call) and stop spinning when the run ends: a pipeline runs
        # its sessions one after another, and workers still spinning after their session's run took
        # the cores from the next session (the first denoising step measured 170 ms instead of 77 ms).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        # Memory patterns pre-plan one block per input shape and keep it (bench-sd3: +53 MB for the
        # denoiser, no measurable speed-up); allocations come from the shared arena instead.
        options.enable_mem_pattern = False
        cpu = "CPUExecutionProvider" in self.providers
        if cpu:
            _shared_cpu_arena()
            options.add_session_config_entry("session.use_env_allocators", "1")
        # Without VNNI, ONNX Runtime's x86 u8 x s8 GEMM saturates (runtime/backends/cpu.py): int8 linears
        # then get uint8 weights and the exact u8 x u8 kernel (fusions.py), and the other Q/DQ nodes
        # run as written (dequantize, float op).
        saturating = cpu and not cpu_info().int8_dot
        if saturating:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        return options, saturating

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.inputs, feeds)
        results = self._session.run(self._output_names, {s.name: feeds[s.name] for s in self.inputs})
        return dict(zip(self._output_names, results))

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Run with the bundle's weights except `weights` ({initializer: value}, LoRA); `{}` restores
        the bundle's weights exactly.

        The session is re-created from memory: the first call reads the ONNX file once and keeps
        the graph (without its weights) and every weight as an array (the external data file mapped,
        not copied); every session after that gets its weights with `add_external_initializers`,
        the changed ones from `weights`. The file is not read again. A weight that the load-time
        rewrites derived from an initializer (fusions.py: an AdaLN weight with constants folded in)
        is derived again from the new value.

        Raises:
            InputError: a name that is not an initializer of the model, or a value of another shape.
            BundleError: ONNX Runtime could not create the session.
        """
        import onnxruntime as ort

        state = self._weights
        if state is None:
            state = self._weights = _InMemoryWeights.load(self.path, rewrite="CPUExecutionProvider" in self.providers, unsigned_weights=self._session_options()[1])
        overrides = state.overrides(weights)
        options, _ = self._session_options()
        names = list(state.base)
        values = [ort.OrtValue.ortvalue_from_numpy(overrides[n]) if n in overrides else state.value(n) for n in names]
        options.add_external_initializers(names, values)
        try:
            session = ort.InferenceSession(state.graph, options, providers=list(self.providers))
        except Exception as err:  # onnxruntime raises its own exception types
            raise BundleError(f"ONNX Runtime could not re-create the session of {self.path} with new weights: {err}") from err
        # A call in flight keeps the old session (and its weights) alive until it returns.
        self._session, self._kept = session, values

    def close(self) -> None:
        """Release the session; the engine cannot be called afterwards."""
        self._session = None
        self._weights = None
        self._kept = []


def load_engines(bundle: str | os.PathLike, manifest: Manifest, options: BackendOptions = BackendOptions()) -> dict[str, OnnxRuntimeEngine]:
    """One `OnnxRuntimeEngine` per component of the bundle, with `options.providers` (default CPU) and `options.threads`."""
    providers = tuple(options.providers or ("CPUExecutionProvider",))
    return {
        name: OnnxRuntimeEngine(os.path.join(bundle, comp.file), comp.inputs, comp.outputs, providers=providers, threads=options.threads)
        for name, comp in manifest.components.items()
    }


# Initializers kept in the graph as they are: too small to be a weight a LoRA changes, or integers
# that shape inference reads when the model is loaded (before external initializers are injected).
_MIN_ELEMENTS = 16
_SWAPPABLE = {"float32", "float16", "bfloat16", "int8", "uint8", "float8_e4m3fn"}
_IN_MEMORY = "latentrt-in-memory"


@dataclass
class _InMemoryWeights:
    """A model's graph without its weights, and every weight as an array (what `set_weights` needs).

    Attributes:
        graph: the serialized model (after the load-time rewrites) whose weights are external
            data that nothing on disk holds: each session gets them with `add_external_initializers`.
        base: initializer -> its bundle value (arrays; external data as read-only maps of the file).
        derived: initializer made by a rewrite -> (source initializer, function of the source's value).
    """

    graph: bytes
    base: dict[str, np.ndarray]
    derived: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = field(default_factory=dict)
    _values: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str, *, rewrite: bool, unsigned_weights: bool) -> _InMemoryWeights:
        import onnx
        from onnx import numpy_helper

        model = onnx.load(path, load_external_data=False)
        folder = Path(path).parent
        external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        derived: dict = {}
        if rewrite and not external:
            rewrite_model(model, unsigned_weights=unsigned_weights, derived=derived)
        base = {}
        for tensor in model.graph.initializer:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            if np.dtype(dtype).name not in _SWAPPABLE or np.prod(tensor.dims, dtype=np.int64) < _MIN_ELEMENTS:
                continue
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in tensor.external_data}
                base[tensor.name] = np.memmap(
                    folder / info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)), shape=tuple(tensor.dims)
                )
            else:
                base[tensor.name] = numpy_helper.to_array(tensor)
            nbytes = base[tensor.name].nbytes
            tensor.ClearField("raw_data")
            for repeated in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(repeated)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", _IN_MEMORY), ("offset", "0"), ("length", str(nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        return cls(model.SerializeToString(), base, derived)

    def value(self, name: str):
        """The bundle value of `name` as an OrtValue (made once)."""
        import onnxruntime as ort

        if name not in self._values:
            self._values[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(self.base[name]))
        return self._values[name]

    def overrides(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{initializer of the graph: new value} for new bundle values `weights`, derived ones included."""
        sources: dict[str, list[str]] = {}
        for name, (source, _) in self.derived.items():
            sources.setdefault(source, []).append(name)
        out, problems = {}, []
        for name, value in weights.items():
            targets = ([name] if name in self.base else []) + sources.get(name, [])
            if not targets:
                problems.append(f"{name!r} is not a weight of the model")
                continue
            value = np.asarray(value)
            for target in targets:
                base = self.base[target]
                new = self.derived[target][1](value) if target in self.derived else value
                if new.shape != base.shape:
                    problems.append(f"{name!r} has shape {list(value.shape)}, the model's weight {list(base.shape)}")
                    continue
                out[target] = np.ascontiguousarray(new.astype(base.dtype, copy=False))
        if problems:
            raise InputError("cannot set these weights:\n  - " + "\n  - ".join(problems))
        return out

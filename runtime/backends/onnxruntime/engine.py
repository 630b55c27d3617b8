"""ONNX Runtime backend: one `InferenceSession` per component behind the engine contract."""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Sequence

import numpy as np

from latentrt.errors import BundleError, InputError
from latentrt.bundle.manifest import Manifest, TensorSpec
from latentrt.runtime.engine import BackendOptions
from latentrt.runtime.backends.cpu import cpu_info
from latentrt.runtime.backends.onnxruntime.fusions import rewritten_for_onnx_runtime

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


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

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        # Worker threads spin between the ops of a run (waking a sleeping worker per op cost the
        # bench-sd3 denoiser 62 -> 68 ms a call) and stop spinning when the run ends: a pipeline runs
        # its sessions one after another, and workers still spinning after their session's run took
        # the cores from the next session (the first denoising step measured 170 ms instead of 77 ms).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        # Memory patterns pre-plan one block per input shape and keep it (bench-sd3: +53 MB for the
        # denoiser, no measurable speed-up); allocations come from the shared arena instead.
        options.enable_mem_pattern = False
        cpu = "CPUExecutionProvider" in providers
        if cpu:
            _shared_cpu_arena()
            options.add_session_config_entry("session.use_env_allocators", "1")
        # Without VNNI, ONNX Runtime's x86 u8 x s8 GEMM saturates (runtime/backends/cpu.py): int8 linears
        # then get uint8 weights and the exact u8 x u8 kernel (fusions.py), and the other Q/DQ nodes
        # run as written (dequantize, float op).
        saturating = cpu and not cpu_info().int8_dot
        if saturating:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        # ONNX Runtime may map the copy's data file: on Linux it can go at once, elsewhere it may have to wait.
        with tempfile.TemporaryDirectory(prefix="latentrt-", ignore_cleanup_errors=True) as scratch:
            try:
                rewritten = rewritten_for_onnx_runtime(path, scratch, unsigned_weights=saturating) if cpu else None
                self._session = ort.InferenceSession(str(rewritten or path), options, providers=list(providers))
            except Exception as err:  # onnxruntime raises its own exception types
                raise BundleError(f"ONNX Runtime could not load {path}: {err}") from err
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self._output_names = [o.name for o in self.outputs]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for spec in self.inputs:
            if spec.name not in feeds:
                raise InputError(f"missing input {spec.name!r}; this engine takes {[s.name for s in self.inputs]}")
            array = feeds[spec.name]
            expected = _NUMPY_DTYPES.get(spec.dtype)
            if expected is not None and array.dtype != expected:
                raise InputError(f"input {spec.name!r} has dtype {array.dtype}, expected {spec.dtype}")
            if len(array.shape) != len(spec.shape):
                raise InputError(f"input {spec.name!r} has shape {array.shape}, expected rank {len(spec.shape)} {spec.shape}")
        results = self._session.run(self._output_names, {s.name: feeds[s.name] for s in self.inputs})
        return dict(zip(self._output_names, results))

    def close(self) -> None:
        """Release the session; the engine cannot be called afterwards."""
        self._session = None


def load_engines(bundle: str | os.PathLike, manifest: Manifest, options: BackendOptions = BackendOptions()) -> dict[str, OnnxRuntimeEngine]:
    """One `OnnxRuntimeEngine` per component of the bundle, with `options.providers` (default CPU) and `options.threads`."""
    providers = tuple(options.providers or ("CPUExecutionProvider",))
    return {
        name: OnnxRuntimeEngine(os.path.join(bundle, comp.file), comp.inputs, comp.outputs, providers=providers, threads=options.threads)
        for name, comp in manifest.components.items()
    }

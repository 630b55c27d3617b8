"""OpenVINO backend: one compiled model per component behind the engine contract (CPU).

OpenVINO reads the bundle's ONNX as it is (no latentrt rewrite) and compiles it for this CPU:

- **precision**: bf16 where the CPU has bf16 matrix instructions (AMX or AVX-512 bf16: Intel Xeon
  Sapphire/Emerald Rapids, AMD EPYC Genoa and later), float32 elsewhere. OpenVINO keeps in float32
  what it must (normalisations, softmax accumulations); the precision it reports after compiling is
  `engine.precision`. `precision="f32"` forces float32.
- **int8**: a bundle from `latentrt calibrate --precision int8` is an explicit Q/DQ graph; OpenVINO
  turns each Q/DQ pair into a quantization and runs the MatMuls/Convs between them in int8 (u8 x s8).
  Without VNNI (AVX2 or AVX-512 without VNNI) the x86 u8 x s8 dot product saturates in 16 bits
  (`runtime/backends/cpu.py`), as it does for ONNX Runtime (bench-sd3's int8 denoiser: relative L2
  8.6e-3 against fp32, 1.1e-3 for the same graph run exactly). There `int8="exact"` (the default on
  such CPUs) compiles without OpenVINO's low-precision transformations: each Q/DQ pair stays a
  FakeQuantize computed in float, so the result is the Q/DQ graph's own, at float32 speed.
- **cache**: the compiled model is cached in `BUNDLE/engines/openvino/<component>.<key16>/` (`cache.py`),
  keyed by the ONNX sha256, OpenVINO's version, the precision and the CPU; the second load skips
  the compilation (the demo's denoiser: 1.4 s -> 0.2 s).

Calls may come from several threads at once: each call takes an infer request from a pool (one per
concurrent call; a compiled model is thread-safe, a request is not).

Example:
    >>> engines = load_engines("bundles/sd3", load_manifest("bundles/sd3"))  # doctest: +SKIP
    >>> engines["vae_decoder"]({"latent_sample": latents})["sample"].shape  # doctest: +SKIP
    (1, 3, 1024, 1024)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from latentrt.bundle.manifest import Manifest, TensorSpec
from latentrt.errors import BundleError, InputError, LatentRTError
from latentrt.runtime.backends.cpu import cpu_info
from latentrt.runtime.engine import BackendOptions, check_feeds

log = logging.getLogger(__name__)

Precision = Literal["auto", "f32", "bf16"]
Int8Mode = Literal["auto", "kernels", "exact"]

#: CPU flags that change which kernels OpenVINO compiles (part of the cache key)
MATRIX_FLAGS = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "amx_fp16"})


def _openvino():
    try:
        import openvino
    except ImportError as err:
        raise LatentRTError(
            "the openvino backend needs the OpenVINO runtime: pip install -e \".[openvino]\" (or pip install openvino), "
            "or load the bundle with backend='onnxruntime'"
        ) from err
    return openvino


def resolve_precision(precision: Precision) -> str:
    """"bf16" where the CPU has bf16 matrix instructions and `precision` is "auto", else `precision` ("f32" for "auto")."""
    if precision not in ("auto", "f32", "bf16"):
        raise InputError(f"precision must be 'auto', 'f32' or 'bf16', got {precision!r}")
    if precision == "auto":
        return "bf16" if cpu_info().bf16 else "f32"
    return precision


def resolve_int8(int8: Int8Mode) -> str:
    """"kernels" (OpenVINO's int8 kernels) where the CPU has int8 dot products without saturation
    (VNNI, AMX, or not x86) and `int8` is "auto", else "exact"; an explicit choice is kept."""
    if int8 not in ("auto", "kernels", "exact"):
        raise InputError(f"int8 must be 'auto', 'kernels' or 'exact', got {int8!r}")
    if int8 == "auto":
        return "kernels" if cpu_info().int8_dot else "exact"
    return int8


class OpenVinoEngine:
    """Runs one ONNX model with OpenVINO's CPU plugin: `engine({name: ndarray}) -> {name: ndarray}`.

    Args:
        path: the .onnx file (external data next to it is found by OpenVINO).
        inputs, outputs: the manifest's tensor specs; feeds are checked against them.
        core: the `openvino.Core` shared by a pipeline's engines (one is made when None).
        precision: "auto" (bf16 where the CPU has it, else f32), "f32" or "bf16".
        int8: what to do with Q/DQ pairs: "auto" (int8 kernels where the CPU's int8 dot products do
            not saturate, else "exact"), "kernels" or "exact" (quantization rounding kept, products in float).
        threads: inference threads (0 lets OpenVINO choose: one per physical core).
        cache_dir: OpenVINO's compiled-model cache folder (None: no cache).

    Attributes:
        precision: the inference precision OpenVINO compiled for ("bf16" or "f32").
        compile_s: seconds spent reading and compiling (or loading from the cache).
    """

    concurrent_calls = True

    def __init__(
        self,
        path: str | os.PathLike,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        *,
        core=None,
        precision: Precision = "auto",
        int8: Int8Mode = "auto",
        threads: int = 0,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        ov = _openvino()
        core = core or ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": resolve_precision(precision)}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if cache_dir is not None:
            config["CACHE_DIR"] = str(cache_dir)
        if resolve_int8(int8) == "exact":
            # The CPU plugin's switch for its low-precision transformations (not in its list of
            # supported properties, but read by the plugin; checked by tests/runtime/backends/test_openvino.py).
            config["LP_TRANSFORMS_MODE"] = "NO"
        start = time.perf_counter()
        try:
            self._compiled = core.compile_model(str(path), "CPU", config)
        except RuntimeError as err:  # OpenVINO raises RuntimeError subclasses for read and compile errors
            raise BundleError(f"OpenVINO could not compile {path}: {err}") from err
        self.compile_s = time.perf_counter() - start
        self.precision = self._compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        names = {name: port for port in self._compiled.outputs for name in port.get_names()}
        missing = [o.name for o in self.outputs if o.name not in names]
        if missing:
            raise BundleError(f"{path}: OpenVINO's model has no output {missing[0]!r} (it has {sorted(names)}); re-export the bundle")
        self._ports = [(o.name, names[o.name]) for o in self.outputs]
        self._idle: list = []  # infer requests not in use; one per concurrent call
        self._lock = threading.Lock()

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.inputs, feeds)
        compiled = self._compiled
        if compiled is None:
            raise InputError("this engine was closed; load the bundle again")
        with self._lock:
            request = self._idle.pop() if self._idle else compiled.create_infer_request()
        try:
            results = request.infer({s.name: np.ascontiguousarray(feeds[s.name]) for s in self.inputs})
            # The request's output tensors are reused by its next call: copy them out.
            return {name: np.array(results[port], copy=True) for name, port in self._ports}
        finally:
            with self._lock:
                self._idle.append(request)

    def close(self) -> None:
        """Release the compiled model and its requests; the engine cannot be called afterwards."""
        with self._lock:
            self._idle.clear()
            self._compiled = None


def load_engines(
    bundle: str | os.PathLike,
    manifest: Manifest,
    options: BackendOptions = BackendOptions(),
    *,
    precision: Precision = "auto",
    int8: Int8Mode = "auto",
    cache: bool = True,
) -> dict[str, OpenVinoEngine]:
    """One `OpenVinoEngine` per component of the bundle, sharing one `openvino.Core`, with
    `options.threads` inference threads and each compiled model cached in the bundle (`cache.py`)."""
    from latentrt.runtime.backends.openvino.cache import CompiledModelSpec, cache_folder

    ov = _openvino()
    core = ov.Core()
    cpu = cpu_info()
    wanted, int8_mode = resolve_precision(precision), resolve_int8(int8)
    engines: dict[str, OpenVinoEngine] = {}
    try:
        for name, comp in manifest.components.items():
            folder = None
            if cache:
                spec = CompiledModelSpec(
                    component=name,
                    onnx_sha256=comp.sha256,
                    library_version=ov.__version__,
                    precision=wanted,
                    cpu=cpu.name,
                    isa=tuple(sorted(cpu.flags & MATRIX_FLAGS)),
                    int8=int8_mode,
                )
                folder = cache_folder(bundle, spec)
            engines[name] = OpenVinoEngine(
                Path(bundle) / comp.file, comp.inputs, comp.outputs,
                core=core, precision=wanted, int8=int8_mode, threads=options.threads, cache_dir=folder,
            )
            log.info("%s: compiled for %s in %.2f s", name, engines[name].precision, engines[name].compile_s)
    except BaseException:
        for engine in engines.values():
            engine.close()
        raise
    return engines

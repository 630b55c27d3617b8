"""Build TensorRT / TensorRT-RTX engines for a bundle's components.

`build_engines(bundle, config)` does, for every selected component:

1. resolve its optimization profile from the manifest and the config (`profiles.py`); all
   profiles and compute capabilities are checked before the first build starts;
2. compute the cache key (`cache.py`) and skip the build when the engine is already there;
3. parse the ONNX file with TensorRT's OnnxParser (`parse_from_file`, so external data works) into a
   strongly typed network, and check its inputs and outputs against the manifest;
4. configure the builder (optimization level, workspace limit, target compute capabilities,
   timing cache, progress monitor, refit / weight stripping), set the profile and
   `build_serialized_network`;
5. write the engine and its metadata into `BUNDLE/engines/` atomically, with the memory totals the
   builder logged (activations, weights) and, for refittable engines, the weights a refit may set.

TensorRT-RTX builds ahead of time without a GPU; NVIDIA TensorRT needs the GPU it builds for. The
default target, "auto", is what can run on this machine's GPU (`library.resolve_target`).

Weights (`BuildConfig.weights`): "embedded" (default) bakes them into the plan; "refittable"
(BuilderFlag.REFIT) keeps them in the plan and lets `TensorRTEngine.refit` replace them later (LoRA)
without a rebuild; "stripped" (REFIT + STRIP_PLAN) leaves them out of the plan, which is then
refitted from the bundle's ONNX at load. TensorRT-RTX 1.7 compiles refittable engines with the CUDA
driver: on a machine without one the build fails (the error says so).

Example:
    >>> config = BuildConfig(target="tensorrt-rtx", compute_capabilities=("8.9",), batch=(1, 1, 2))  # doctest: +SKIP
    >>> for result in build_engines("bundles/sd3", config):  # doctest: +SKIP
    ...     print(result.component, result.status, result.record.engine_bytes)
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from latentrt.bundle.writer import atomic_write
from latentrt.engines.cache import EngineRecord, EngineSpec, EngineStatus, find_engine, list_engines, write_engine
from latentrt.engines.library import (
    TARGETS,
    Target,
    TensorRTLibrary,
    current_compute_capability,
    load_library,
    make_logger,
    parse_compute_capability,
    resolve_target,
    rtx_can_target,
    visible_compute_capability,
)
from latentrt.engines.memory import io_bytes_at_max, parse_builder_memory
from latentrt.engines.profiles import ComponentProfile, Guidance, ShapeRequest, Size, Triple, resolve_profiles
from latentrt.errors import BuildError, InputError
from latentrt.bundle.manifest import Component, Manifest, load_manifest

log = logging.getLogger(__name__)

Reuse = Literal["cache", "rebuild"]
Weights = Literal["embedded", "refittable", "stripped"]
WEIGHTS: tuple[str, ...] = ("embedded", "refittable", "stripped")


@dataclass(frozen=True)
class BuildConfig:
    """How to build a bundle's engines. Round-trips through JSON (`to_dict` / `from_dict`).

    Args:
        target: "auto" (default: NVIDIA TensorRT when installed and a GPU is here, TensorRT-RTX for
            the GPU here when it targets it, TensorRT-RTX's portable default without a GPU),
            "tensorrt-rtx" (ahead of time, no GPU needed) or "tensorrt" (NVIDIA TensorRT 10/11,
            builds for the GPU in this machine).
        compute_capabilities: TensorRT-RTX targets, e.g. ("8.6", "8.9"); empty: the GPU here with
            target "auto", else the library's default (portable across 8.0, 8.6, 8.9 and 12.0).
            Must be empty for "tensorrt".
        batch: images per call (min, opt, max); None keeps the manifest's batch ranges. With
            guidance="cfg" the text encoders and denoiser get (min, 2*opt, 2*max).
        image_size: ((h, w) min, (h, w) opt, (h, w) max) in pixels; None keeps the manifest's.
        text_length: T5 tokens (min, opt, max); None keeps the manifest's.
        guidance: "cfg" or "none" (see `profiles.py`).
        opt_level: builder optimization level 0 (fastest build) to 5 (slowest build, most tuning).
        workspace: workspace memory pool limit in bytes; None keeps the library's default.
        timing_cache: a timing-cache file read before and written after each build (NVIDIA
            TensorRT; TensorRT-RTX ignores timing caches).
        components: build only these components; empty builds all.
        reuse: "cache" skips engines whose key matches; "rebuild" always builds.
        weights: "embedded", "refittable" or "stripped" (see the module docstring).
    """

    target: Target | Literal["auto"] = "auto"
    compute_capabilities: tuple[str, ...] = ()
    batch: Triple | None = None
    image_size: tuple[Size, Size, Size] | None = None
    text_length: Triple | None = None
    guidance: Guidance = "cfg"
    opt_level: int = 3
    workspace: int | None = None
    timing_cache: str | None = None
    components: tuple[str, ...] = ()
    reuse: Reuse = "cache"
    weights: Weights = "embedded"

    def __post_init__(self) -> None:
        if self.target not in (*TARGETS, "auto"):
            raise InputError(f"unknown target {self.target!r}; choose auto, {', '.join(TARGETS)}")
        if self.weights not in WEIGHTS:
            raise InputError(f"weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        ccs = (self.compute_capabilities,) if isinstance(self.compute_capabilities, str) else self.compute_capabilities
        for cc in ccs:
            parse_compute_capability(cc)
        ordered = sorted({str(cc).strip() for cc in ccs}, key=parse_compute_capability)
        object.__setattr__(self, "compute_capabilities", tuple(ordered))
        if isinstance(self.components, str):
            object.__setattr__(self, "components", (self.components,))
        object.__setattr__(self, "components", tuple(self.components))
        if not (isinstance(self.opt_level, int) and 0 <= self.opt_level <= 5):
            raise InputError(f"opt_level must be an integer from 0 (fastest build) to 5 (most tuning), got {self.opt_level!r}")
        if self.workspace is not None and (not isinstance(self.workspace, int) or self.workspace <= 0):
            raise InputError(f"workspace must be a positive number of bytes, got {self.workspace!r}")
        if self.reuse not in ("cache", "rebuild"):
            raise InputError(f"reuse must be 'cache' or 'rebuild', got {self.reuse!r}")
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", os.fspath(self.timing_cache))
        # Validates and normalizes the shape fields (lists from JSON become tuples).
        request = self.shape_request()
        object.__setattr__(self, "batch", request.batch)
        object.__setattr__(self, "image_size", request.image_size)
        object.__setattr__(self, "text_length", request.text_length)

    def shape_request(self) -> ShapeRequest:
        return ShapeRequest(batch=self.batch, image_size=self.image_size, text_length=self.text_length, guidance=self.guidance)

    def to_dict(self) -> dict[str, Any]:
        shapes = self.shape_request().to_dict()
        return {
            "target": self.target,
            "compute_capabilities": list(self.compute_capabilities),
            **shapes,
            "opt_level": self.opt_level,
            "workspace": self.workspace,
            "timing_cache": self.timing_cache,
            "components": list(self.components),
            "reuse": self.reuse,
            "weights": self.weights,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BuildConfig:
        d = dict(d)
        for key in ("compute_capabilities", "components"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclass(frozen=True)
class BuildProgress:
    """One progress event, passed to `build_engines(..., progress=callback)`.

    `event` is "component_start" / "component_done" around each component (status "built" or
    "cached" in `phase` for done), and "phase_start" / "step" / "phase_finish" from TensorRT's
    progress monitor (`phase`, its `parent`, `step` of `num_steps`). Phase names are TensorRT's and
    change between versions.
    """

    component: str
    event: Literal["component_start", "component_done", "phase_start", "step", "phase_finish"]
    phase: str = ""
    parent: str | None = None
    step: int = 0
    num_steps: int = 0


ProgressCallback = Callable[[BuildProgress], None]


@dataclass(frozen=True)
class NetworkTensor:
    """A network input or output as the parser reported it (-1 for a dynamic dimension)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class NetworkInfo:
    """What TensorRT's ONNX parser made of a model."""

    inputs: tuple[NetworkTensor, ...]
    outputs: tuple[NetworkTensor, ...]
    num_layers: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "num_layers": self.num_layers,
        }


@dataclass(frozen=True)
class SerializedEngine:
    """The result of one builder run."""

    data: Any  # a buffer (TensorRT's IHostMemory)
    network: NetworkInfo
    parse_seconds: float
    build_seconds: float
    warnings: tuple[str, ...] = ()
    memory: dict[str, int] = field(default_factory=dict)  # the builder's totals: activations, weights, ...
    refit_weights: tuple[dict[str, Any], ...] = ()  # refittable engines: the weights a refit may set


@dataclass(frozen=True)
class BuildResult:
    """One component's engine after `build_engines`.

    Attributes:
        component: the component name.
        status: "built" (built now) or "cached" (an engine with the same key was already there).
        record: the engine's metadata; `record.build_seconds` is the time of the build that made it.
        engine: the engine file's absolute path.
        network: what the parser reported (None for cached engines, whose ONNX was not parsed).
    """

    component: str
    status: Literal["built", "cached"]
    record: EngineRecord
    engine: Path
    network: NetworkInfo | None = None


# ---------------------------------------------------------------------------------------------
# Planning: specs and keys, no builder
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedEngine:
    """One engine a config asks for: its profile and its cache spec."""

    component: str
    profile: ComponentProfile
    spec: EngineSpec


def plan_engines(
    bundle: str | os.PathLike,
    config: BuildConfig,
    *,
    manifest: Manifest | None = None,
    library: TensorRTLibrary | None = None,
) -> list[PlannedEngine]:
    """The engines `config` asks for, with their profiles and cache keys; builds nothing.

    Validates everything a build would need up front: the components exist, the profile fits the
    manifest, the library is installed and accepts the compute capabilities.

    Raises:
        InputError: a bad request (the message says what and how to fix it).
        BundleError: the bundle or its manifest is broken.
    """
    manifest = manifest or load_manifest(bundle)
    profiles = resolve_profiles(manifest, config.shape_request(), config.components)
    library, ccs = _resolve_library(config, library)
    _check_weights_mode(library, config.weights)
    planned = []
    for name, profile in profiles.items():
        comp = manifest.components[name]
        spec = EngineSpec(
            component=name,
            onnx_sha256=comp.sha256,
            library=library.target,
            library_version=library.version,
            compute_capabilities=ccs,
            profile=profile.to_dict(),
            flags=_key_flags(Path(bundle), config, comp, library),
        )
        planned.append(PlannedEngine(name, profile, spec))
    return planned


def _resolve_library(config: BuildConfig, library: TensorRTLibrary | None) -> tuple[TensorRTLibrary, tuple[str, ...]]:
    """The library to build with and the compute capabilities to target, for `config` on this machine."""
    if library is not None:
        return library, _target_compute_capabilities(library, config)
    gpu = visible_compute_capability() if config.target != "tensorrt" else None
    target, why = resolve_target(config.target, gpu)
    library = load_library(target)
    if config.target == "auto":
        log.info("build target: %s (%s)", target, why)
        if target == "tensorrt-rtx" and gpu is not None and not config.compute_capabilities:
            return library, (gpu,)  # the GPU here, not RTX's portable default
    ccs = _target_compute_capabilities(library, config)
    if target == "tensorrt-rtx" and gpu is not None and ccs and gpu not in ccs:
        log.warning("the engines target compute capability %s; they will not run on this GPU (%s)", ", ".join(ccs), gpu)
    elif target == "tensorrt-rtx" and gpu is not None and not ccs and not rtx_can_target(gpu):
        log.warning("TensorRT-RTX's default targets do not include this GPU (compute capability %s): these engines will not run here", gpu)
    return library, ccs


def _check_weights_mode(library: TensorRTLibrary, weights: str) -> None:
    flags = library.module.BuilderFlag
    if weights != "embedded" and not hasattr(flags, "REFIT"):
        raise InputError(f"{library.module_name} {library.version} cannot build refittable engines; build with weights='embedded'")
    if weights == "stripped" and not hasattr(flags, "STRIP_PLAN"):
        raise InputError(
            f"{library.module_name} {library.version} cannot build weight-stripped engines (no STRIP_PLAN); "
            "build with weights='refittable' or 'embedded'"
        )


def _target_compute_capabilities(library: TensorRTLibrary, config: BuildConfig) -> tuple[str, ...]:
    if library.supports_compute_capabilities:
        for cc in config.compute_capabilities:
            library.compute_capability(cc)  # raises InputError for one the library cannot target
        return config.compute_capabilities
    if config.compute_capabilities:
        library.compute_capability(config.compute_capabilities[0])  # raises: this library builds for the local GPU only
    # NVIDIA TensorRT builds for the GPU it runs on: that GPU's compute capability is part of the key.
    return (current_compute_capability(),)


def _key_flags(bundle: Path, config: BuildConfig, comp: Component, library: TensorRTLibrary) -> dict[str, Any]:
    # The manifest's sha256 covers the .onnx file only; external weights enter the key by size.
    external = {name: (bundle / name).stat().st_size if (bundle / name).is_file() else None for name in sorted(comp.external_data)}
    return {
        "opt_level": config.opt_level,
        "workspace": config.workspace,
        "strongly_typed": True,
        "precision": comp.precision,
        "external_data": external,
        "weights": config.weights,
        "user_allocation": library.supports_user_allocation,
    }


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def build_engines(
    bundle: str | os.PathLike,
    config: BuildConfig | None = None,
    *,
    progress: ProgressCallback | None = None,
) -> list[BuildResult]:
    """Build (or find in the cache) an engine for every selected component of `bundle`.

    Args:
        bundle: a bundle directory written by `latentrt export`.
        config: what to build; `BuildConfig()` builds every component for TensorRT-RTX with the
            manifest's shape ranges.
        progress: called with a `BuildProgress` for each component and each builder phase/step.

    Returns:
        One `BuildResult` per component, in manifest order.

    Raises:
        InputError: the request does not fit the bundle or the library (raised before any build).
        BuildError: TensorRT's parser or builder rejected a component; the message holds their errors.
        BundleError: the bundle is missing or its files do not match the manifest.
    """
    config = config or BuildConfig()
    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    library, _ = _resolve_library(config, None)
    planned = plan_engines(bundle, config, manifest=manifest, library=library)
    timing_cache = Path(config.timing_cache) if config.timing_cache else None
    if timing_cache is not None and not library.supports_timing_cache:
        log.info("timing caches are no-ops in %s %s; ignoring %s", library.module_name, library.version, timing_cache)
        timing_cache = None

    results = []
    for plan in planned:
        name = plan.component
        comp = manifest.components[name]
        if progress:
            progress(BuildProgress(name, "component_start"))
        cached = find_engine(bundle, plan.spec) if config.reuse == "cache" else None
        if cached is not None:
            log.info("%s: engine %s is up to date (key %s), skipping the build", name, cached.engine_file, plan.spec.key[:16])
            result = BuildResult(name, "cached", cached, bundle / cached.engine_file)
        else:
            log.info("%s: building %s engine (key %s)", name, library.target, plan.spec.key[:16])
            built = build_serialized_engine(
                library,
                bundle / comp.file,
                plan.profile.shapes,
                expected=comp,
                component=name,
                compute_capabilities=plan.spec.compute_capabilities if library.supports_compute_capabilities else (),
                opt_level=config.opt_level,
                workspace=config.workspace,
                timing_cache=timing_cache,
                progress=progress,
                weights=config.weights,
            )
            inputs, outputs = [_spec_dict(s) for s in comp.inputs], [_spec_dict(s) for s in comp.outputs]
            memory = {**built.memory, "io": io_bytes_at_max(plan.spec.profile, inputs, outputs, vae_scale_factor=manifest.latent.vae_scale_factor)}
            record = write_engine(
                bundle,
                plan.spec,
                built.data,
                build_seconds=built.build_seconds,
                parse_seconds=built.parse_seconds,
                inputs=inputs,
                outputs=outputs,
                network=built.network.to_dict(),
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                memory=memory,
                refit={"mode": config.weights, "weights": list(built.refit_weights)} if config.weights != "embedded" else {},
            )
            log.info("%s: built %s (%d bytes) in %.2f s", name, record.engine_file, record.engine_bytes, record.build_seconds)
            result = BuildResult(name, "built", record, bundle / record.engine_file, built.network)
        if progress:
            progress(BuildProgress(name, "component_done", phase=result.status))
        results.append(result)
    return results


def inspect_engines(bundle: str | os.PathLike, config: BuildConfig | None = None) -> list[EngineStatus]:
    """The bundle's engines, each "current" or "stale", plus "missing" ones, for `latentrt inspect`.

    Without `config`, an engine is current when it was built from the manifest's present ONNX file
    and its file is intact (no TensorRT import). With `config`, it must also match the engine that
    config would build (same profile, library version, compute capabilities and flags), and engines
    that config asks for but that are not built are listed as "missing".
    """
    manifest = load_manifest(bundle, verify=False)
    expected = None
    if config is not None:
        expected = {p.component: p.spec for p in plan_engines(bundle, config, manifest=manifest)}
    return list_engines(bundle, manifest, expected)


def build_serialized_engine(
    library: TensorRTLibrary,
    onnx_path: str | os.PathLike,
    shapes: Mapping[str, tuple[Iterable[int], Iterable[int], Iterable[int]]],
    *,
    expected: Component | None = None,
    component: str = "",
    compute_capabilities: Iterable[str] = (),
    opt_level: int = 3,
    workspace: int | None = None,
    timing_cache: Path | None = None,
    progress: ProgressCallback | None = None,
    weights: Weights = "embedded",
) -> SerializedEngine:
    """Parse one ONNX file and build a serialized engine for one optimization profile.

    This is the step under `build_engines`, without the manifest's profile checks or the cache:
    `shapes` go to the builder as given, so it reports what it rejects.

    Args:
        shapes: per input name, its (min, opt, max) shapes.
        expected: the manifest's component; the network's inputs and outputs are checked against it.
        weights: "embedded", "refittable" (REFIT) or "stripped" (REFIT + STRIP_PLAN).

    Raises:
        BuildError: the parser or the builder failed; the message lists every error they logged.
    """
    logger = make_logger(library)
    logger.clear()
    logger.keep_info = True  # the builder's memory totals
    try:
        return _build(
            library, logger, onnx_path, shapes, expected=expected, component=component, compute_capabilities=compute_capabilities,
            opt_level=opt_level, workspace=workspace, timing_cache=timing_cache, progress=progress, weights=weights,
        )
    finally:
        logger.keep_info = False


def _build(library, logger, onnx_path, shapes, *, expected, component, compute_capabilities, opt_level, workspace, timing_cache, progress, weights):  # noqa: ANN001, ANN202
    trt = library.module
    where = component or Path(onnx_path).stem
    builder = trt.Builder(logger)
    network = builder.create_network(library.network_flags)
    parser = trt.OnnxParser(network, logger)

    t0 = time.perf_counter()
    try:
        parsed = parser.parse_from_file(os.fspath(onnx_path))
    except Exception as err:  # the bindings raise RuntimeError/TypeError on unreadable files
        raise BuildError(f"{where}: TensorRT's ONNX parser could not read {onnx_path}: {err}") from err
    parse_seconds = time.perf_counter() - t0
    if not parsed:
        errors = [_format_parser_error(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        raise BuildError(
            f"{where}: {library.module_name} {library.version}'s ONNX parser rejected {onnx_path} "
            f"({len(errors)} error(s)):\n  - " + "\n  - ".join(errors) + "\nAn operator the library does not support must be "
            "replaced in the export (or exported at another opset); see the library's ONNX operator support matrix."
        )
    info = _network_info(library, network)
    if expected is not None:
        _check_network(where, info, expected)
    refit_weights = refittable_weights(network, onnx_path, logger) if weights != "embedded" else ()

    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if weights != "embedded":
        config.set_flag(trt.BuilderFlag.REFIT)
    if weights == "stripped":
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
    if library.supports_user_allocation:
        config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
    if workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    ccs = tuple(compute_capabilities)
    if ccs:
        config.num_compute_capabilities = len(ccs)
        for index, cc in enumerate(ccs):
            if not config.set_compute_capability(library.compute_capability(cc), index):
                raise BuildError(f"{where}: {library.module_name} refused compute capability {cc}: " + "; ".join(logger.errors))
    monitor = None
    if progress is not None and library.supports_progress_monitor:
        monitor = _make_progress_monitor(library, where, progress)
        config.progress_monitor = monitor
    cache = None
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("%s: timing cache %s does not match this library or GPU; starting a new one", where, timing_cache)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)

    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        try:
            profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        except (ValueError, TypeError, RuntimeError) as err:
            raise BuildError(f"{where}: the builder rejected the profile shapes of input {name!r} ({lo}, {opt}, {hi}): {err}") from err
    if config.add_optimization_profile(profile) < 0:
        raise BuildError(f"{where}: the builder rejected the optimization profile {dict(shapes)}: " + "; ".join(logger.errors))

    t0 = time.perf_counter()
    try:
        serialized = builder.build_serialized_network(network, config)
    except Exception as err:
        raise BuildError(f"{where}: {library.module_name} raised during the build: {err}\n" + "\n".join(logger.errors)) from err
    build_seconds = time.perf_counter() - t0
    if monitor is not None and monitor.error is not None:
        raise monitor.error
    if serialized is None or serialized.nbytes == 0:
        errors = logger.errors or ["(the library logged no error; enable DEBUG logging for latentrt.engines to see all its messages)"]
        if weights != "embedded" and any("CUDA_SUCCESS" in e or "cudaError 35" in e or "CUDA driver" in e for e in errors):
            errors.append(
                f"hint: {library.module_name} {library.version} compiles {weights} engines with the CUDA driver, which this machine "
                "lacks: build them on a machine with an NVIDIA driver (any GPU), or build with weights='embedded'"
            )
        if any("OutOfMemory" in e for e in errors):
            errors.append(
                "hint: the engine needs more memory than the builder may use"
                + (f" (workspace limit {workspace} bytes): raise the workspace limit" if workspace else "")
                + " or lower the profile's max batch / image size"
            )
        raise BuildError(
            f"{where}: {library.module_name} {library.version} could not build an engine from {onnx_path} "
            f"(profile {dict(shapes)}, compute capabilities {list(ccs) or 'default'}):\n  - " + "\n  - ".join(errors)
        )
    if cache is not None and timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(timing_cache, memoryview(config.get_timing_cache().serialize()).cast("B"))
    memory = parse_builder_memory(logger.messages)
    return SerializedEngine(serialized, info, parse_seconds, build_seconds, tuple(logger.warnings), memory, refit_weights)


def refittable_weights(network: Any, onnx_path: str | os.PathLike, logger: Any = None) -> tuple[dict[str, Any], ...]:
    """The ONNX initializers that the parsed `network` holds as named weights: what a refit of the
    engine may set (`Refitter.set_named_weights` / the ONNX refitter), in the ONNX file's order.

    The parser names each weight after its initializer; initializers it folded into other
    constants, or that only feed shape computations, have no named weights. The network is asked
    name by name (`mark_weights_refittable` answers whether it has weights of that name; the mark is
    removed again, so the network is unchanged). Reads the ONNX graph without its external data.

    Returns:
        One {"name", "dtype", "shape"} per weight (dtype as the manifest names it: "float32", ...).
    """
    import onnx
    from onnx import helper

    model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    found = []
    for init in model.graph.initializer:
        if network.are_weights_marked_refittable(init.name):
            known = True
        else:
            known = bool(network.mark_weights_refittable(init.name))
            if known:
                network.unmark_weights_refittable(init.name)
        if known:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).name
            found.append({"name": init.name, "dtype": dtype, "shape": [int(d) for d in init.dims]})
    if logger is not None:
        logger.errors.clear()  # "there are no weights named ..." for every initializer the network does not hold
    return tuple(found)



def _spec_dict(spec: Any) -> dict[str, Any]:
    return {"name": spec.name, "dtype": spec.dtype, "shape": list(spec.shape)}


def _format_parser_error(err: Any) -> str:
    node, name, op = err.node(), err.node_name(), err.node_operator()
    where = f"node {node}" if node >= 0 else "model"
    if op or name:
        where += f" ({op} {name!r})"
    return f"{where}: {err.desc()} [{getattr(err.code(), 'name', err.code())}]"


def _network_info(library: TensorRTLibrary, network: Any) -> NetworkInfo:
    def tensor(t: Any) -> NetworkTensor:
        return NetworkTensor(t.name, library.dtype_name(t.dtype), tuple(int(d) for d in t.shape))

    return NetworkInfo(
        inputs=tuple(tensor(network.get_input(i)) for i in range(network.num_inputs)),
        outputs=tuple(tensor(network.get_output(i)) for i in range(network.num_outputs)),
        num_layers=int(network.num_layers),
    )


def _check_network(where: str, info: NetworkInfo, comp: Component) -> None:
    """The parsed network must have the manifest's input/output names, dtypes, ranks and fixed sizes."""
    problems = []
    for kind, actual, specs in (("input", info.inputs, comp.inputs), ("output", info.outputs, comp.outputs)):
        found = {t.name: t for t in actual}
        names = [s.name for s in specs]
        if sorted(found) != sorted(names):
            problems.append(f"the network's {kind}s are {sorted(found)}, the manifest's {sorted(names)}")
            continue
        for spec in specs:
            t = found[spec.name]
            if t.dtype != spec.dtype:
                problems.append(f"{kind} {spec.name!r} is {t.dtype} in the network, {spec.dtype} in the manifest")
            if len(t.shape) != len(spec.shape):
                problems.append(f"{kind} {spec.name!r} has shape {t.shape} in the network, {tuple(spec.shape)} in the manifest")
                continue
            for i, (dim, want) in enumerate(zip(t.shape, spec.shape)):
                if isinstance(want, int) and dim not in (want, -1):
                    problems.append(f"{kind} {spec.name!r} dimension {i} is {dim} in the network, {want} in the manifest")
    if problems:
        raise BuildError(
            f"{where}: the ONNX model does not match the manifest ({'; '.join(problems)}); the bundle is inconsistent, re-export it"
        )


def _make_progress_monitor(library: TensorRTLibrary, component: str, callback: ProgressCallback) -> Any:
    trt = library.module

    class Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        """Forwards phases and steps to `callback`; an exception in it cancels the build and is re-raised after."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.error: BaseException | None = None

        def _send(self, event: BuildProgress) -> bool:
            if self.error is not None:
                return False
            try:
                callback(event)
            except BaseException as err:  # noqa: BLE001 - must not propagate into the C++ builder
                self.error = err
                return False
            return True

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self._send(BuildProgress(component, "phase_start", phase_name, parent_phase, 0, int(num_steps)))

        def step_complete(self, phase_name: str, step: int) -> bool:
            return self._send(BuildProgress(component, "step", phase_name, None, int(step) + 1))

        def phase_finish(self, phase_name: str) -> None:
            self._send(BuildProgress(component, "phase_finish", phase_name))

    return Monitor()

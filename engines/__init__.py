"""TensorRT and TensorRT-RTX engines for a bundle's components.

Build every component of a bundle into `BUNDLE/engines/`, skipping engines already built with the
same ONNX file, library, compute capabilities, profile and flags::

    from latentrt.engines import BuildConfig, build_engines, inspect_engines

    config = BuildConfig(target="tensorrt-rtx", compute_capabilities=("8.6", "8.9"), batch=(1, 1, 2))
    results = build_engines("bundles/sd3", config)   # one BuildResult per component
    statuses = inspect_engines("bundles/sd3", config)  # current / stale / missing

Modules: `library` (find NVIDIA TensorRT or TensorRT-RTX, the default target), `profiles`
(optimization profiles from the manifest and a request), `cache` (keys, metadata, atomic writes,
content hashes, stale detection), `build` (parse, check, build), `memory` (what engines need on the
GPU), `select` (which engines can run here, which serves a call). The engines run through `latentrt.runtime.backends.tensorrt.engine`.
TensorRT itself is imported only when a build or a config check needs it.
"""

from latentrt.engines.build import (
    BuildConfig,
    BuildProgress,
    BuildResult,
    NetworkInfo,
    PlannedEngine,
    build_engines,
    build_serialized_engine,
    inspect_engines,
    plan_engines,
)
from latentrt.engines.cache import EngineRecord, EngineSpec, EngineStatus, find_engine, list_engines
from latentrt.engines.library import TensorRTLibrary, is_available, load_library, resolve_target
from latentrt.engines.memory import EngineMemory, PipelineMemory, pipeline_memory
from latentrt.engines.select import choose_engines
from latentrt.engines.profiles import (
    ComponentProfile,
    ShapeRequest,
    parse_batch,
    parse_image_size,
    parse_text_length,
    profile_from_shapes,
    resolve_profiles,
)

__all__ = [
    "BuildConfig",
    "BuildProgress",
    "BuildResult",
    "ComponentProfile",
    "EngineMemory",
    "EngineRecord",
    "EngineSpec",
    "EngineStatus",
    "NetworkInfo",
    "PipelineMemory",
    "PlannedEngine",
    "ShapeRequest",
    "TensorRTLibrary",
    "build_engines",
    "build_serialized_engine",
    "choose_engines",
    "find_engine",
    "inspect_engines",
    "is_available",
    "list_engines",
    "load_library",
    "parse_batch",
    "parse_image_size",
    "parse_text_length",
    "pipeline_memory",
    "plan_engines",
    "profile_from_shapes",
    "resolve_profiles",
    "resolve_target",
]

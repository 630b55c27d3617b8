"""Find the TensorRT library to build with: NVIDIA TensorRT or TensorRT-RTX.

Both expose the same Python API (`Builder`, `OnnxParser`, `IBuilderConfig`, ...) under different
module names; `load_library(target)` imports the right one and says what it can do, so that the
builder has one code path for both. Nothing is imported until `load_library` is called.

| target         | modules tried, in order                 | pip packages (or the extra)                                          |
| -------------- | --------------------------------------- | -------------------------------------------------------------------- |
| "tensorrt"     | `tensorrt`                              | tensorrt, cuda-python (`latentrt[tensorrt]`)                         |
| "tensorrt-rtx" | `tensorrt_rtx`, `tensorrt_rtx_bindings` | tensorrt-rtx-cu13-libs, tensorrt-rtx-cu13-bindings (`[tensorrt-rtx]`) |

Networks are always strongly typed: precision comes from the ONNX model's dtypes (and its Q/DQ
nodes), never from builder flags. TensorRT 10 needs the STRONGLY_TYPED creation flag for that;
TensorRT 11 and TensorRT-RTX are strongly typed whatever the flags (TensorRT-RTX 1.7 still accepts
the flag, so it is set wherever the enum has it).
"""

from __future__ import annotations

import importlib
import logging
import re
import weakref
from dataclasses import dataclass
from typing import Any, Literal, get_args

from latentrt.errors import InputError

Target = Literal["tensorrt", "tensorrt-rtx"]
TARGETS: tuple[str, ...] = get_args(Target)

# The GPUs an engine built by TensorRT-RTX without explicit compute capabilities runs on (its
# portable default: Ampere, Ada and Blackwell RTX; not Turing, not Hopper). Documented by NVIDIA for
# TensorRT-RTX 1.x ("8.0, 8.6, 8.9, 12.0 and later" where later means the same 12.x family).
RTX_DEFAULT_COMPUTE_CAPABILITIES: tuple[str, ...] = ("8.0", "8.6", "8.9", "12.0")

_MODULES: dict[str, tuple[str, ...]] = {
    "tensorrt": ("tensorrt",),
    "tensorrt-rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings"),
}
_PIP: dict[str, str] = {
    "tensorrt": "pip install tensorrt cuda-python  (or: pip install 'latentrt[tensorrt]')",
    "tensorrt-rtx": "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings  (or: pip install 'latentrt[tensorrt-rtx]')",
}

# TensorRT DataType member names -> the numpy-style dtype names the manifest uses.
DTYPE_NAMES: dict[str, str] = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
    "FP8": "float8_e4m3fn",
    "INT4": "int4",
    "FP4": "float4_e2m1fn",
    "E8M0": "float8_e8m0fnu",
}

_CC_PATTERN = re.compile(r"^(\d+)\.(\d+)$")


@dataclass(frozen=True)
class TensorRTLibrary:
    """An imported TensorRT library and what it supports.

    Attributes:
        target: "tensorrt" or "tensorrt-rtx".
        module: the imported Python module (use it as `trt`).
        module_name: the name it was imported under.
        version: the module's `__version__`.
    """

    target: Target
    module: Any
    module_name: str
    version: str

    @property
    def network_flags(self) -> int:
        """Flags for `Builder.create_network`: STRONGLY_TYPED where the enum has it, else 0."""
        flag = getattr(self.module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return 0 if flag is None else 1 << int(flag)

    @property
    def supports_compute_capabilities(self) -> bool:
        """Whether the builder can target chosen compute capabilities (TensorRT-RTX ahead-of-time builds)."""
        return hasattr(self.module.IBuilderConfig, "set_compute_capability") and hasattr(self.module, "ComputeCapability")

    @property
    def supports_timing_cache(self) -> bool:
        """TensorRT-RTX keeps the timing-cache API but its operations are no-ops (deprecated in 1.2)."""
        return self.target == "tensorrt"

    @property
    def supports_user_allocation(self) -> bool:
        """TensorRT-RTX's REQUIRE_USER_ALLOCATION builder flag: the engine runs on memory the
        application provides, which CUDA stream capture (our CUDA graphs) needs. Set on every RTX build."""
        return self.target == "tensorrt-rtx" and hasattr(self.module.BuilderFlag, "REQUIRE_USER_ALLOCATION")

    @property
    def supports_progress_monitor(self) -> bool:
        return hasattr(self.module, "IProgressMonitor")

    def compute_capability_names(self) -> tuple[str, ...]:
        """The compute capabilities this library can target, as "8.6"-style strings (empty for NVIDIA TensorRT)."""
        if not self.supports_compute_capabilities:
            return ()
        names = []
        for member in self.module.ComputeCapability.__members__:
            match = re.fullmatch(r"SM(\d+)(\d)", member)
            if match:
                names.append(f"{match[1]}.{match[2]}")
        return tuple(names)

    def compute_capability(self, cc: str) -> Any:
        """The library's `ComputeCapability` member for "8.6"-style `cc`.

        Raises:
            InputError: the library cannot target compute capabilities, or not this one.
        """
        if not self.supports_compute_capabilities:
            raise InputError(
                f"compute capability {cc!r} was requested, but {self.module_name} {self.version} builds only for the GPU "
                "in this machine; leave compute_capabilities empty, or build with target 'tensorrt-rtx'"
            )
        major, minor = parse_compute_capability(cc)
        member = getattr(self.module.ComputeCapability, f"SM{major}{minor}", None)
        if member is None:
            raise InputError(
                f"{self.module_name} {self.version} cannot target compute capability {cc}; "
                f"it supports {', '.join(self.compute_capability_names())}"
            )
        return member

    def dtype_name(self, dtype: Any) -> str:
        """The manifest's name ("float32", "int64", ...) for a TensorRT `DataType`."""
        return DTYPE_NAMES.get(dtype.name, dtype.name.lower())


def parse_compute_capability(cc: str) -> tuple[int, int]:
    """ "8.6" -> (8, 6).

    Raises:
        InputError: `cc` is not MAJOR.MINOR.
    """
    match = _CC_PATTERN.match(str(cc).strip())
    if not match:
        raise InputError(f"compute capability {cc!r} is not of the form MAJOR.MINOR, for example '8.6' or '12.0'")
    return int(match[1]), int(match[2])


def load_library(target: Target = "tensorrt-rtx") -> TensorRTLibrary:
    """Import the TensorRT library for `target`.

    Raises:
        InputError: `target` is unknown, or its library is not installed (the message names the pip packages).

    Example:
        >>> lib = load_library("tensorrt-rtx")  # doctest: +SKIP
        >>> lib.module_name, lib.version  # doctest: +SKIP
        ('tensorrt_rtx_bindings', '1.7.1.116')
    """
    if target not in _MODULES:
        raise InputError(f"unknown TensorRT target {target!r}; choose one of {', '.join(TARGETS)}")
    failures = []
    for name in _MODULES[target]:
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            failures.append(f"{name}: {err}")
            continue
        return TensorRTLibrary(target=target, module=module, module_name=name, version=str(getattr(module, "__version__", "unknown")))
    raise InputError(
        f"building for {target!r} needs its Python library, which could not be imported ({'; '.join(failures)}); "
        f"install it with: {_PIP[target]}"
    )


def is_available(target: Target = "tensorrt-rtx") -> bool:
    """Whether `load_library(target)` would succeed (imports the module if it is there)."""
    try:
        load_library(target)
    except InputError:
        return False
    return True


def installed_version(target: Target) -> str | None:
    """The version of `target`'s library when it can be imported here, else None."""
    try:
        return load_library(target).version
    except InputError:
        return None


def visible_compute_capability(device: int = 0) -> str | None:
    """The compute capability of CUDA device `device`, or None when cuda-python or a usable GPU is missing."""
    from latentrt.errors import LatentRTError

    try:
        cudart = load_cudart()
        count = cuda_check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
        if not count or device >= count:
            return None
        return current_compute_capability(device)
    except (InputError, LatentRTError):
        return None


def resolve_target(requested: str, compute_capability: str | None, *, installed: dict[str, str | None] | None = None) -> tuple[Target, str]:
    """The build target for `requested` ("auto", "tensorrt" or "tensorrt-rtx") and why.

    "auto" picks what can run on this machine's GPU (`compute_capability`; None: no GPU visible):
    NVIDIA TensorRT when it is installed and a GPU is there (it builds for that GPU), TensorRT-RTX
    when it targets the GPU, TensorRT-RTX ahead of time when there is no GPU.

    Args:
        installed: per target, its installed version or None (default: try to import each).

    Raises:
        InputError: "auto" found nothing that can build engines for this GPU; the message says what to install.
    """
    if requested in TARGETS:
        return requested, "requested"  # type: ignore[return-value]
    if requested != "auto":
        raise InputError(f"unknown TensorRT target {requested!r}; choose auto, {', '.join(TARGETS)}")
    installed = installed if installed is not None else {t: installed_version(t) for t in TARGETS}  # type: ignore[arg-type]
    if compute_capability is None:
        if installed.get("tensorrt-rtx"):
            return "tensorrt-rtx", "no GPU is visible: TensorRT-RTX builds ahead of time for its default compute capabilities"
        raise InputError(
            "no GPU is visible and TensorRT-RTX (the library that builds without one) is not installed: "
            f"{_PIP['tensorrt-rtx']}; NVIDIA TensorRT builds only on the GPU it targets"
        )
    if installed.get("tensorrt"):
        return "tensorrt", f"NVIDIA TensorRT {installed['tensorrt']} builds for this GPU (compute capability {compute_capability})"
    if installed.get("tensorrt-rtx") and rtx_can_target(compute_capability):
        return "tensorrt-rtx", f"TensorRT-RTX targets this GPU (compute capability {compute_capability})"
    raise InputError(
        f"this GPU (compute capability {compute_capability}) needs NVIDIA TensorRT: "
        + ("TensorRT-RTX is installed but does not target it (it supports 7.5, 8.0, 8.6, 8.9 and 12.x, not Hopper 9.0); " if installed.get("tensorrt-rtx") else "")
        + f"install it with: {_PIP['tensorrt']}, or pass --target tensorrt-rtx --compute-capability ... to build for another GPU"
    )


def rtx_can_target(compute_capability: str) -> bool:
    """Whether TensorRT-RTX 1.x can build for `compute_capability` (7.5, 8.0, 8.6, 8.9, 12.x)."""
    major, minor = parse_compute_capability(compute_capability)
    return (major, minor) in {(7, 5), (8, 0), (8, 6), (8, 9)} or major == 12


def load_cudart() -> Any:
    """cuda-python's CUDA runtime module (`cuda.bindings.runtime`, or the older `cuda.cudart`).

    Raises:
        InputError: cuda-python is not installed.
    """
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as err:
            raise InputError(f"running TensorRT engines needs cuda-python ({err}); install it with: pip install cuda-python") from err
    return cudart


def cuda_check(result: Any, what: str) -> Any:
    """Unpack a cuda-python call's `(err, *values)` tuple, raising on an error.

    Raises:
        LatentRTError: the call returned an error code; the message names the call and the CUDA error.
    """
    from latentrt.errors import LatentRTError

    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        raise LatentRTError(f"CUDA call {what} failed with {name} ({int(err)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def current_compute_capability(device: int = 0) -> str:
    """The compute capability ("8.9") of CUDA device `device`, through cuda-python.

    Raises:
        InputError: cuda-python is missing.
        LatentRTError: there is no usable CUDA device.
    """
    cudart = load_cudart()
    attr = cudart.cudaDeviceAttr
    major = cuda_check(cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute")
    minor = cuda_check(cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute")
    return f"{major}.{minor}"


# TensorRT keeps one logger per process while any of its objects (builder, runtime, refitter) is
# alive: a logger passed to a later one is ignored ("differs from one already registered"). To see
# the errors of every operation, every object gets the logger that is already registered; it lives
# as long as the objects that hold it (weak references), so this mirrors the library's own state.
_LIVE_LOGGERS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def make_logger(library: TensorRTLibrary) -> Any:
    """A TensorRT `ILogger` that keeps errors (`.errors`) and warnings (`.warnings`) and forwards to Python logging.

    One logger serves many operations (deserialize, set shapes, execute, refit): call `clear()`
    before each, so an error reported is that operation's. With `keep_info = True` it also keeps
    INFO messages (`.messages`), where the builder reports its memory totals.

    Errors go to logging at DEBUG only: the caller raises them in a `BuildError` (or similar) with
    context, so they are reported once. Warnings go to logging as warnings, the rest at DEBUG.
    """
    trt = library.module
    severity = trt.ILogger.Severity
    errors_at = {severity.INTERNAL_ERROR, severity.ERROR}
    to_logging = {
        severity.INTERNAL_ERROR: logging.DEBUG,  # raised as BuildError; logged once there
        severity.ERROR: logging.DEBUG,
        severity.WARNING: logging.WARNING,
        severity.INFO: logging.DEBUG,
        severity.VERBOSE: logging.DEBUG,
    }
    trt_log = logging.getLogger(f"latentrt.engines.{library.module_name}")

    class CapturingLogger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []
            self.messages: list[str] = []  # INFO messages (the builder's memory totals), when asked for
            self.keep_info = False

        def clear(self) -> None:
            """Forget what was collected: call before each operation whose errors you report."""
            self.errors.clear()
            self.warnings.clear()
            self.messages.clear()

        def log(self, sev: Any, msg: str) -> None:
            if sev in errors_at:
                self.errors.append(msg)
            elif sev == severity.WARNING:
                self.warnings.append(msg)
            elif sev == severity.INFO and self.keep_info:
                self.messages.append(msg)
            level = to_logging.get(sev, logging.DEBUG)
            if trt_log.isEnabledFor(level):
                trt_log.log(level, "%s", msg)

    logger = CapturingLogger()
    _LIVE_LOGGERS[library.module_name] = logger
    return logger

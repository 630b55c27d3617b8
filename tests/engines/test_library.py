"""Finding the TensorRT library; what TensorRT-RTX 1.7 offers the builder."""

from __future__ import annotations

import pytest

from latentrt.engines import library as library_module
from latentrt.engines.library import is_available, load_library, parse_compute_capability
from latentrt.errors import InputError


def test_unknown_target():
    with pytest.raises(InputError, match="unknown TensorRT target 'onnx'; choose one of tensorrt, tensorrt-rtx"):
        load_library("onnx")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "target, packages",
    [("tensorrt", "pip install tensorrt cuda-python"), ("tensorrt-rtx", "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")],
)
def test_missing_library_names_the_pip_packages(monkeypatch, target, packages):
    def no_module(name, *args):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(library_module.importlib, "import_module", no_module)
    with pytest.raises(InputError) as err:
        load_library(target)
    assert packages in str(err.value)
    assert not is_available(target)


@pytest.mark.parametrize("text, expected", [("8.6", (8, 6)), ("12.0", (12, 0)), (" 8.9 ", (8, 9))])
def test_parse_compute_capability(text, expected):
    assert parse_compute_capability(text) == expected


@pytest.mark.parametrize("text", ["86", "sm_86", "8.6.1", ""])
def test_parse_compute_capability_rejects(text):
    with pytest.raises(InputError, match="MAJOR.MINOR"):
        parse_compute_capability(text)


def test_rtx_is_strongly_typed_and_targets_compute_capabilities(rtx):
    trt = rtx.module
    assert rtx.target == "tensorrt-rtx"
    assert rtx.module_name in ("tensorrt_rtx", "tensorrt_rtx_bindings")
    assert rtx.version.startswith("1.")
    assert rtx.network_flags == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert rtx.supports_compute_capabilities and rtx.supports_progress_monitor
    assert not rtx.supports_timing_cache  # no-ops in TensorRT-RTX since 1.2
    assert {"7.5", "8.0", "8.6", "8.9", "12.0"} <= set(rtx.compute_capability_names())
    assert rtx.compute_capability("8.6") == trt.ComputeCapability.SM86
    assert rtx.compute_capability("12.0") == trt.ComputeCapability.SM120


def test_rtx_rejects_hopper(rtx):
    with pytest.raises(InputError) as err:
        rtx.compute_capability("9.0")
    assert "cannot target compute capability 9.0" in str(err.value) and "8.6, 8.9" in str(err.value)


def test_logger_captures_errors(rtx):
    trt = rtx.module
    logger = library_module.make_logger(rtx)
    logger.log(trt.ILogger.Severity.ERROR, "boom")
    logger.log(trt.ILogger.Severity.WARNING, "careful")
    logger.log(trt.ILogger.Severity.INFO, "fyi")
    assert logger.errors == ["boom"] and logger.warnings == ["careful"]


def test_dtype_names(rtx):
    trt = rtx.module
    assert [rtx.dtype_name(d) for d in (trt.float32, trt.float16, trt.bfloat16, trt.int64, trt.int32, trt.bool)] == [
        "float32",
        "float16",
        "bfloat16",
        "int64",
        "int32",
        "bool",
    ]


@pytest.mark.parametrize(
    "gpu, installed, expected",
    [
        (None, {"tensorrt-rtx": "1.7.1.116", "tensorrt": None}, "tensorrt-rtx"),
        ("8.9", {"tensorrt-rtx": "1.7.1.116", "tensorrt": None}, "tensorrt-rtx"),
        ("12.0", {"tensorrt-rtx": "1.7.1.116", "tensorrt": None}, "tensorrt-rtx"),
        ("9.0", {"tensorrt-rtx": "1.7.1.116", "tensorrt": "10.13.0.35"}, "tensorrt"),
        ("8.9", {"tensorrt-rtx": "1.7.1.116", "tensorrt": "10.13.0.35"}, "tensorrt"),
    ],
)
def test_auto_target_is_what_runs_on_this_gpu(gpu, installed, expected):
    from latentrt.engines.library import resolve_target

    target, why = resolve_target("auto", gpu, installed=installed)
    assert target == expected and why


def test_auto_target_on_hopper_without_nvidia_tensorrt_explains():
    from latentrt.engines.library import resolve_target

    with pytest.raises(InputError) as err:
        resolve_target("auto", "9.0", installed={"tensorrt-rtx": "1.7.1.116", "tensorrt": None})
    assert "compute capability 9.0) needs NVIDIA TensorRT" in str(err.value) and "not Hopper" in str(err.value)
    assert "pip install tensorrt cuda-python" in str(err.value)
    with pytest.raises(InputError, match="no GPU is visible and TensorRT-RTX"):
        resolve_target("auto", None, installed={"tensorrt-rtx": None, "tensorrt": None})
    assert resolve_target("tensorrt-rtx", "9.0", installed={}) == ("tensorrt-rtx", "requested")


def test_no_gpu_is_visible_here():
    from latentrt.engines.library import visible_compute_capability

    try:
        from latentrt.engines.library import load_cudart

        err, count = load_cudart().cudaGetDeviceCount()
    except InputError:
        count = 0
    if count:
        pytest.skip("a GPU is visible")
    assert visible_compute_capability() is None


def test_the_rtx_extra_installs_what_the_runtime_imports():
    """Every module the TensorRT-RTX runtime imports comes from a distribution the extra names."""
    import importlib
    import importlib.metadata
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["tensorrt-rtx"]
    named = {re.split(r"[<>=!~ \[]", req, maxsplit=1)[0].lower().replace("_", "-") for req in extra}
    providers = importlib.metadata.packages_distributions()
    for module in ("tensorrt_rtx_bindings", "cuda", "onnx", "ml_dtypes"):
        pytest.importorskip(module, reason=f"{module} is not installed here (make install installs the tensorrt-rtx extra)")
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        # cuda-python is a meta package: the module `cuda` comes from cuda-bindings, which it requires
        if module == "cuda":
            requires = importlib.metadata.requires("cuda-python") or []
            dists |= {"cuda-python"} if any(r.startswith("cuda-bindings") for r in requires) and "cuda-bindings" in dists else set()
        assert dists & named, (module, dists, named)
    importlib.import_module("cuda.bindings.runtime")

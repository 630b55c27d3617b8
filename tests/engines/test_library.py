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

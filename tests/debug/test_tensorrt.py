"""Polygraphy's TensorRT runner as the candidate (needs an NVIDIA GPU and NVIDIA TensorRT)."""

from __future__ import annotations

import importlib.util

import pytest

from latentrt.debug import DebugConfig, debug_bundle
from latentrt.errors import InputError

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tensorrt_gpu():
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("NVIDIA TensorRT is not installed (pip install 'latentrt[tensorrt]'); Polygraphy's TrtRunner needs it")
    try:
        from latentrt.engines.library import load_cudart

        err, count = load_cudart().cudaGetDeviceCount()
    except InputError:
        pytest.skip("cuda-python is not installed: pip install cuda-python")
    if int(err) != 0 or count < 1:
        pytest.skip("no CUDA GPU is visible")


def test_fp32_engine_matches_onnxruntime(tensorrt_gpu, tiny_sd3_bundle):
    report = debug_bundle(tiny_sd3_bundle, DebugConfig(backend="tensorrt", steps=2))
    assert report.backend == "tensorrt" and "onnxruntime" in report.reference
    assert report.first_nonfinite is None and report.first_over_tolerance is None
    assert report.layers[-1].rel_l2 < 1e-3


def test_naive_fp16_engine_overflows_at_the_planted_matmul(tensorrt_gpu, t5_overflow):
    fp32, naive, islands, node = t5_overflow
    report = debug_bundle(naive, DebugConfig(component="text_encoder_3", reference=str(fp32), backend="tensorrt", steps=2))
    assert report.first_nonfinite == node and node in report.suggestion.keep_fp32
    clean = debug_bundle(islands, DebugConfig(component="text_encoder_3", reference=str(fp32), backend="tensorrt", steps=2))
    assert clean.first_nonfinite is None

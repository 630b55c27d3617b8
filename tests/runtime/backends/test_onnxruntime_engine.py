"""The ONNX Runtime engine: int8 graphs give the Q/DQ graph's values on whatever CPU runs them."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from latentrt.bundle.manifest import load_manifest
from latentrt.runtime.backends import cpu
from latentrt.runtime.backends.onnxruntime.engine import OnnxRuntimeEngine


def _exact(path):
    """The Q/DQ graph evaluated as written: no fusions, so no integer kernels."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(comp, seed=0):
    rng = np.random.default_rng(seed)
    sizes = {"batch": 2, "latent_height": 16, "latent_width": 16, "context_length": 77 + 8}
    return {s.name: rng.standard_normal([sizes.get(d, d) for d in s.shape]).astype(np.float32) for s in comp.inputs}


@pytest.mark.parametrize("int8_dot", [True, False, None], ids=["vnni", "no-vnni", "this-cpu"])
def test_int8_denoiser_matches_the_qdq_graph(int8_bundle, monkeypatch, int8_dot):
    """Without VNNI the x86 int8 GEMM saturates (1e-2 relative error on an AVX2 EPYC): the engine must
    then run the Q/DQ graph exactly. With VNNI (or on other architectures) it uses the int8 kernels."""
    if int8_dot is not None:
        real = cpu.cpu_info()
        if int8_dot and not real.int8_dot:
            pytest.skip(f"this CPU ({real.name}, {real.matrix_isa}) has no VNNI: its int8 kernels saturate")
        monkeypatch.setattr(
            "latentrt.runtime.backends.onnxruntime.engine.cpu_info",
            lambda: cpu.CpuInfo(real.name, real.machine, real.flags | {"avx512_vnni"} if int8_dot else frozenset({"avx2"})),
        )
    comp = load_manifest(int8_bundle).components["transformer"]
    path = int8_bundle / comp.file
    feeds = _feeds(comp)
    expected = _exact(path).run(["sample"], feeds)[0]
    actual = OnnxRuntimeEngine(path, comp.inputs, comp.outputs)(feeds)["sample"]
    assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 1e-4

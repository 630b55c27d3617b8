"""TensorRT-RTX parses and builds the int8 and fp8 Q/DQ denoisers (ahead of time, no GPU needed)."""

from __future__ import annotations

import pytest

from latentrt.bundle.manifest import load_manifest


@pytest.mark.parametrize("which", ["int8_bundle", "fp8_bundle"])
def test_tensorrt_rtx_builds_the_qdq_transformer(which, request):
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed: pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")
    from latentrt.engines import build_serialized_engine, load_library

    bundle = request.getfixturevalue(which)
    comp = load_manifest(bundle).components["transformer"]
    fixed = lambda *shape: (shape, shape, shape)  # noqa: E731
    shapes = {"hidden_states": fixed(2, 16, 16, 16), "encoder_hidden_states": fixed(2, 77, 96), "pooled_projections": fixed(2, 80), "timestep": fixed(2)}
    # Ada (8.9) is the first architecture with fp8 tensor cores; int8 builds for it too.
    engine = build_serialized_engine(load_library("tensorrt-rtx"), bundle / comp.file, shapes, expected=comp, compute_capabilities=("8.9",), opt_level=0)
    assert engine.data.nbytes > 0
    assert engine.network.num_layers > 100

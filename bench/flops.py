"""The floor: FLOPs per stage counted from the ONNX graphs, over the machine's measured GEMM rate."""

from __future__ import annotations

import os
import time

import numpy as np


def onnx_flops(path: str | os.PathLike, input_shapes: dict[str, list[int]]) -> float:
    """Multiply-add FLOPs (2 per MAC) of MatMul, Gemm and Conv for one call with these input shapes.

    Shapes of intermediate tensors come from ONNX shape inference on a copy of the graph whose
    inputs are fixed to `input_shapes`; element-wise ops are not counted (they are memory-bound).
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for value in model.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, input_shapes[value.name]):
                dim.Clear()
                dim.dim_value = size
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else 0 for d in value.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)

    flops = 0.0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            a = shapes.get(node.input[0])
            out = shapes.get(node.output[0])
            if not a or not out or 0 in out or 0 in a:
                continue
            k = a[-2] if node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute) else a[-1]
            flops += 2.0 * float(np.prod(out)) * k
        elif node.op_type == "Conv":
            w, out = shapes.get(node.input[1]), shapes.get(node.output[0])
            if not w or not out or 0 in out:
                continue
            flops += 2.0 * float(np.prod(out)) * float(np.prod(w[1:]))
    return flops


def gemm_rate(size: int = 1024, seconds: float = 1.0) -> float:
    """The machine's dense float32 GEMM rate (FLOP/s) through numpy's BLAS, best of repeated runs."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b  # warm up
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best

"""The floor: FLOPs per stage counted from the ONNX graphs, over the machine's measured GEMM rate."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def onnx_flops(path: str | os.PathLike, input_shapes: dict[str, list[int]]) -> float:
    """Multiply-add FLOPs (2 per MAC) of MatMul, Gemm and Conv for one call with these input shapes.

    Shapes of intermediate tensors come from ONNX shape inference on a copy of the graph whose
    inputs are fixed to `input_shapes`, after the export's static-shape folding: with every input
    dim fixed, sizes computed at run time (a Reshape's target read from Shape) become constants, so
    no MatMul is left with an unknown shape (plain inference missed SD3's attention products, a third of
    bench-sd3's FLOPs). Element-wise ops are not counted (they are memory-bound); a layer whose shape
    still cannot be inferred is skipped with a warning.
    """
    import onnx

    from latentrt.export.graph_passes import fold_static_shapes

    model = onnx.load(str(path), load_external_data=False)
    for value in model.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, input_shapes[value.name]):
                dim.Clear()
                dim.dim_value = size
    del model.graph.value_info[:]
    fold_static_shapes(model)
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else 0 for d in value.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)

    flops, unknown = 0.0, []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            a = shapes.get(node.input[0])
            out = shapes.get(node.output[0])
            if not a or not out or 0 in out or 0 in a:
                unknown.append(node.name)
                continue
            k = a[-2] if node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute) else a[-1]
            flops += 2.0 * float(np.prod(out)) * k
        elif node.op_type == "Conv":
            w, out = shapes.get(node.input[1]), shapes.get(node.output[0])
            if not w or not out or 0 in out:
                unknown.append(node.name)
                continue
            flops += 2.0 * float(np.prod(out)) * float(np.prod(w[1:]))
    if unknown:
        log.warning("%s: %d layers with shapes that inference cannot resolve are not counted (%s, ...)", Path(path).name, len(unknown), unknown[0])
    return flops


def gemm_rates(size: int = 1024, seconds: float = 1.0, threads: int = 0) -> dict[str, float]:
    """The machine's dense float32 GEMM rate (FLOP/s), best of repeated [size x size] products, through
    numpy's BLAS and through ONNX Runtime's MatMul (`threads` intra-op threads, 0: its default).

    The floor uses the faster of the two: on the 2-core AVX-512 machine ONNX Runtime's GEMM runs at
    ~430 GFLOP/s and numpy's at ~250, so a floor from numpy alone is one the runtime can beat.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    spec = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [size, size])  # noqa: E731
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm", [spec("a"), spec("b")], [spec("c")])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    products = {"numpy": lambda: a @ b, "onnxruntime": lambda: session.run(None, {"a": a, "b": b})}
    rates = {}
    for library, product in products.items():
        product()  # warm up
        best = float("inf")
        deadline = time.perf_counter() + seconds / len(products)
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
        rates[library] = 2.0 * size**3 / best
    return rates

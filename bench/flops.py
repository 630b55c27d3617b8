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


#: what each precision class of matrix rate may use: a backend's floor takes the fastest rate among
#: the classes it can run (`BACKEND_PRECISIONS` in runner.py)
PRECISIONS = ("float32", "bfloat16", "int8")


def gemm_rates(size: int = 1024, seconds: float = 2.0, threads: int = 0, *, bf16: bool | None = None) -> dict[str, dict[str, float]]:
    """The machine's dense GEMM rates (FLOP/s), best of repeated [size x size] products, by precision
    and library: `{"float32": {"numpy": r, "onnxruntime": r, "openvino": r}, "bfloat16": {...}, "int8": {...}}`.

    float32: numpy's BLAS, ONNX Runtime's MatMul, OpenVINO's (when installed). bfloat16 (only where the
    CPU has bf16 matrix instructions, or `bf16=True`): PyTorch's matmul and OpenVINO's, when installed.
    int8: ONNX Runtime's `MatMulInteger` with int8 weights (u8 x s8, the fastest x86 kernel even where it
    saturates) and uint8 weights (u8 x u8), and OpenVINO's on a Q/DQ MatMul. `threads`: intra-op threads
    (0: each library's default). A library that is not installed is left out.

    A floor from the fastest of these is one no backend's GEMMs should beat: on the 2-core AVX-512 EPYC
    ONNX Runtime's float32 GEMM ran at ~430 GFLOP/s and numpy's at ~250, so a floor from numpy alone
    was one the runtime beat.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from latentrt.runtime.backends.cpu import cpu_info

    bf16 = cpu_info().bf16 if bf16 is None else bf16
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a_u8 = rng.integers(0, 256, (size, size), dtype=np.uint8)
    products: dict[tuple[str, str], object] = {("float32", "numpy"): lambda: a @ b}

    def ort_session(nodes, inputs, outputs, inits):
        graph = helper.make_graph(nodes, "gemm", inputs, outputs, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    spec = lambda name, dtype: helper.make_tensor_value_info(name, dtype, [size, size])  # noqa: E731
    f32 = ort_session([helper.make_node("MatMul", ["a", "b"], ["c"])], [spec("a", TensorProto.FLOAT)], [spec("c", TensorProto.FLOAT)], [numpy_helper.from_array(b, "b")])
    products[("float32", "onnxruntime")] = lambda: f32.run(None, {"a": a})
    for name, weights in (("onnxruntime u8s8", rng.integers(-127, 128, (size, size), dtype=np.int8)), ("onnxruntime u8u8", rng.integers(0, 256, (size, size), dtype=np.uint8))):
        session = ort_session(
            [helper.make_node("MatMulInteger", ["a", "w"], ["c"])], [spec("a", TensorProto.UINT8)], [spec("c", TensorProto.INT32)],
            [numpy_helper.from_array(weights, "w")],
        )
        products[("int8", name)] = lambda session=session: session.run(None, {"a": a_u8})
    products.update(_openvino_products(a, b, threads, bf16))
    if bf16:
        products.update(_torch_products(a, b, threads))

    rates: dict[str, dict[str, float]] = {}
    budget = seconds / len(products)
    for (precision, library), product in products.items():
        product()  # warm up
        best = float("inf")
        deadline = time.perf_counter() + budget
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
        rates.setdefault(precision, {})[library] = 2.0 * size**3 / best
    return rates


def _openvino_products(a: np.ndarray, b: np.ndarray, threads: int, bf16: bool) -> dict:
    """OpenVINO's float32 (and bf16) MatMul, and its int8 one on a Q/DQ graph as calibrated bundles write it."""
    try:
        import openvino as ov
        import openvino.opset13 as ops
    except ImportError:
        return {}
    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    products = {}
    for precision, hint in (("float32", "f32"), ("bfloat16", "bf16")):
        if precision == "bfloat16" and not bf16:
            continue
        x = ops.parameter(list(a.shape), ov.Type.f32)
        request = core.compile_model(ov.Model([ops.matmul(x, ops.constant(b), False, False)], [x]), "CPU", {**config, "INFERENCE_PRECISION_HINT": hint}).create_infer_request()
        products[(precision, "openvino")] = lambda request=request: request.infer({0: a})
    # int8: activations quantized per tensor, weights int8 per output channel (symmetric), as `latentrt calibrate` writes them.
    x = ops.parameter(list(a.shape), ov.Type.f32)
    limit = float(np.abs(a).max())
    quantized = ops.fake_quantize(x, *(ops.constant(np.float32(v)) for v in (-limit, limit, -limit, limit)), 255)
    scale = np.abs(b).max(axis=0, keepdims=True) / 127.0
    weights = ops.multiply(ops.convert(ops.constant(np.round(b / scale).astype(np.int8)), ov.Type.f32), ops.constant(scale.astype(np.float32)))
    request = core.compile_model(ov.Model([ops.matmul(quantized, weights, False, False)], [x]), "CPU", config).create_infer_request()
    products[("int8", "openvino")] = lambda: request.infer({0: a})
    return products


def _torch_products(a: np.ndarray, b: np.ndarray, threads: int) -> dict:
    try:
        import torch
    except ImportError:
        return {}
    if threads:
        torch.set_num_threads(threads)
    ta, tb = torch.from_numpy(a).bfloat16(), torch.from_numpy(b).bfloat16()
    return {("bfloat16", "torch"): lambda: torch.mm(ta, tb)}

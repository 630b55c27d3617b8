"""Q/DQ insertion for TensorRT's explicit quantization.

For every quantized layer (graph.Layer):

- its activation input goes through QuantizeLinear -> DequantizeLinear with a per-tensor scale
  `amax / qmax` and zero point 0 (one pair per tensor, shared by the layers that read it);
- its weight is stored quantized (int8, or float8e4m3fn) with per-output-channel scales
  `amax_c / qmax` and read through a DequantizeLinear on the output-channel axis (0 for Conv and
  Gemm with transB=1, 1 for a MatMul's [in, out] weight);
- biases stay float (TensorRT does not parse int32-quantized biases in Q/DQ graphs); outputs get no
  Q/DQ; attention MatMuls and Softmax are not layers, so they stay in high precision.

qmax is 127 for int8 (symmetric, [-127, 127]) and 448 for fp8 E4M3 (opset >= 19).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from latentrt.calibration.graph import GraphIndex, Layer
from latentrt.graph.quantize import QMAX, Precision, quantize_weight, weight_scales

FP8_MIN_OPSET = 19


def activation_scale(amax: float, precision: Precision) -> np.float32:
    return np.float32(amax / QMAX[precision]) if amax > 0 else np.float32(1.0)


def _tensor(name: str, value: np.ndarray) -> onnx.TensorProto:
    if value.dtype.name == "float8_e4m3fn":
        return onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT8E4M3FN, value.shape, value.view(np.uint8).tobytes(), raw=True)
    return numpy_helper.from_array(np.require(value, requirements="C"), name)  # keeps 0-d scales scalar


def _zeros(shape: tuple[int, ...], precision: Precision) -> np.ndarray:
    if precision == "int8":
        return np.zeros(shape, np.int8)
    import ml_dtypes

    return np.zeros(shape, ml_dtypes.float8_e4m3fn)


def insert_qdq(
    model: onnx.ModelProto, layers: Sequence[Layer], activation_amax: Mapping[str, float], precision: Precision,
    quantized: dict | None = None,
) -> int:
    """Quantize `layers` of `model` in place; returns the number of quantized nodes.

    Args:
        layers: from `graph.find_layers(model)` (after any smoothing), already filtered.
        activation_amax: per activation tensor, the calibrated range.
        quantized: if given, receives {quantized weight: (float weight it was made from, its
            per-channel scale initializer, channel axis)} (the weight map follows it, for LoRA).
    """
    if precision == "fp8":
        set_opset(model, FP8_MIN_OPSET)
    graph = model.graph
    index = GraphIndex(model)
    before: dict[str, list[onnx.NodeProto]] = {}  # node name -> nodes to insert before it
    first_consumer = {}
    for layer in layers:
        first_consumer.setdefault(layer.activation, layer.node)
    head: list[onnx.NodeProto] = []
    for tensor, consumer in first_consumer.items():
        scale = f"{tensor}_scale"
        zero = f"{tensor}_zero_point"
        graph.initializer.append(_tensor(scale, np.array(activation_scale(activation_amax[tensor], precision))))
        graph.initializer.append(_tensor(zero, _zeros((), precision)))
        q = onnx.helper.make_node("QuantizeLinear", [tensor, scale, zero], [f"{tensor}_quantized"], name=f"{tensor}_QuantizeLinear")
        dq = onnx.helper.make_node(
            "DequantizeLinear", [f"{tensor}_quantized", scale, zero], [f"{tensor}_dequantized"], name=f"{tensor}_DequantizeLinear"
        )
        if tensor in index.producer:
            before.setdefault(consumer, []).extend([q, dq])
        else:  # a graph input
            head.extend([q, dq])
    for layer in layers:
        node = index.nodes[layer.node]
        node.input[0] = f"{layer.activation}_dequantized"
        weight = index.constant(layer.weight)
        scales = weight_scales(weight, layer.weight_axis, precision)
        base = f"{layer.node}/{layer.weight}"
        graph.initializer.append(_tensor(f"{base}_quantized", quantize_weight(weight, scales, layer.weight_axis, precision)))
        graph.initializer.append(_tensor(f"{base}_scale", scales))
        if quantized is not None:
            quantized[f"{base}_quantized"] = (layer.weight, f"{base}_scale", layer.weight_axis)
        graph.initializer.append(_tensor(f"{base}_zero_point", _zeros(scales.shape, precision)))
        dq = onnx.helper.make_node(
            "DequantizeLinear",
            [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"],
            [f"{base}_dequantized"],
            name=f"{base}_DequantizeLinear",
            axis=layer.weight_axis,
        )
        before.setdefault(layer.node, []).append(dq)
        node.input[layer.weight_index] = f"{base}_dequantized"
    ordered = list(head)
    for node in graph.node:
        ordered.extend(before.get(node.name, ()))
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    from latentrt.calibration.smoothquant import prune_unused

    prune_unused(model)
    return len(layers)


def set_opset(model: onnx.ModelProto, version: int) -> None:
    """Raise the default-domain opset to at least `version` (18 -> 19 changes no op's semantics)."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version < version:
            entry.version = version


def model_opset(model: onnx.ModelProto) -> int:
    return next((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), 0)

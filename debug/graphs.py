"""The two graphs a debug run compares, and which of their tensors can be compared.

- `upcast_model`: a half-precision (fp16 / bf16) graph computed in float32 over its own weights,
  the default reference of a half bundle (whose fp32 graph export does not keep).
- `runnable_model`: what ONNX Runtime's CPU provider runs for a component. Half graphs become
  export's `simulation_model` (every stored tensor rounded through its half dtype, fp32 arithmetic
  inside each op): ONNX Runtime's own fp16 kernels upcast chains of ops to float32 and would hide
  an overflow (export/precision.py's docstring has the measurements).
- `comparable_tensors`: the float node outputs both graphs compute, in the reference's topological
  order (onnx-graphsurgeon's `toposort`), less the tensors that SmoothQuant rescaled on purpose in a
  calibrated graph (their fp32 values divided by a per-channel factor: a difference that is no error).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

FLOAT, FLOAT16, BFLOAT16 = 1, 10, 16  # onnx.TensorProto data types
HALF_TYPES = (FLOAT16, BFLOAT16)
#: Characters Polygraphy's output marking reads as wildcards; tensors named with them are not compared.
_WILDCARDS = ("*", "?", "[", "]")


@dataclass(frozen=True)
class Layer:
    """A node of the reference graph whose float outputs are compared.

    Attributes:
        name: the node's name (its output tensor's name when the node has none).
        op: its op type.
        tensors: its compared output tensors.
        inputs: the float tensors it reads (graph inputs, node outputs; not initializers).
    """

    name: str
    op: str
    tensors: tuple[str, ...]
    inputs: tuple[str, ...]


def load(path: str | os.PathLike, *, weights: bool = True):
    import onnx

    return onnx.load(os.fspath(path), load_external_data=weights)


def save(model, path: str | os.PathLike) -> Path:
    """Save with the weights in `<name>.data` next to it (any size, no second copy in memory)."""
    import onnx

    path = Path(path)
    onnx.save_model(model, os.fspath(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")
    return path


def upcast_model(model):
    """`model` (fp16 / bf16 with fp32 islands) computed in float32, in place: half initializers and
    constants become the float32 of their values (exact), Casts to half become Casts to float32.
    Tensor names are unchanged, so every tensor lines up with the half graph's. Returns `model`."""
    from onnx import numpy_helper

    def widen(tensor) -> None:
        if tensor.data_type in HALF_TYPES:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))

    graph = model.graph
    for tensor in graph.initializer:
        widen(tensor)
    for node in graph.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i in HALF_TYPES:
                a.i = FLOAT
            elif a.HasField("t"):
                widen(a.t)
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        if info.type.tensor_type.elem_type in HALF_TYPES:
            info.type.tensor_type.elem_type = FLOAT
    return model


def runnable_model(path: Path, precision: str, scratch: Path, tag: str) -> Path:
    """The ONNX file ONNX Runtime's CPU provider runs for a component of this precision."""
    if precision not in ("fp16", "bf16"):
        return path
    from latentrt.export.precision import simulation_model

    return simulation_model(path, scratch / f"{tag}.simulated.onnx")


def float_tensors(model) -> set[str]:
    """Names of the node outputs shape inference types as float / float16 / bfloat16 (weights not read)."""
    import onnx

    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for init in skeleton.graph.initializer:  # inference reads only small (shape) constants' values
        if int(np.prod(init.dims)) > 64:
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "external_data"):
                init.ClearField(field)
            init.ClearField("data_location")
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
    except Exception as err:  # best effort: untyped tensors are compared if they come back float
        logger.debug("shape inference failed (%s); comparing every node output", err)
        return {o for n in model.graph.node for o in n.output if o}
    floats = {FLOAT, *HALF_TYPES}
    typed = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    return {o for n in model.graph.node for o in n.output if o and typed.get(o, FLOAT) in floats}


def comparable_tensors(reference, candidate, *, skip: Iterable[str] = ()) -> list[Layer]:
    """The layers to compare: reference nodes (topologically sorted with onnx-graphsurgeon, constants
    folded away from the list) with float outputs the candidate also computes, less `skip`."""
    import onnx_graphsurgeon as gs

    skip = set(skip)
    candidate_outputs = {o for n in candidate.graph.node if n.op_type != "Constant" for o in n.output}
    floats = float_tensors(reference)
    graph = gs.import_onnx(reference)
    graph.toposort()
    readable = floats | {i.name for i in reference.graph.input}
    layers = []
    for node in graph.nodes:
        if node.op == "Constant":
            continue
        outs = tuple(
            t.name for t in node.outputs
            if t.name in floats and t.name in candidate_outputs and t.name not in skip and not any(c in t.name for c in _WILDCARDS)
        )
        if not outs:
            continue
        ins = tuple(t.name for t in node.inputs if isinstance(t, gs.Variable) and t.name in readable)
        layers.append(Layer(name=node.name or outs[0], op=node.op, tensors=outs, inputs=ins))
    return layers


def quantized_layers(candidate) -> set[str]:
    """Nodes of a Q/DQ graph that read a DequantizeLinear output as their weight (the int8 / fp8 layers)."""
    producer = {o: n for n in candidate.graph.node for o in n.output}
    found = set()
    for node in candidate.graph.node:
        if node.op_type in ("MatMul", "Gemm", "Conv") and len(node.input) > 1:
            dq = producer.get(node.input[1])
            if dq is not None and dq.op_type == "DequantizeLinear":
                found.add(node.name)
    return found


def rescaled_by_smoothquant(record: dict | None) -> tuple[set[str], bool]:
    """The tensors SmoothQuant divided per channel, from a bundle's quantization record, and whether
    the record lists them all (bundles calibrated before latentrt recorded the fold paths list only
    the smoothed tensors themselves)."""
    smoothing = (record or {}).get("smoothquant") or {}
    if "rescaled" in smoothing:
        return {t for tensors in smoothing["rescaled"].values() for t in tensors}, True
    return set(smoothing.get("smoothed", {})), not smoothing.get("smoothed")

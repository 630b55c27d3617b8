"""Reading an exported ONNX graph: which nodes are quantizable layers, their weights' layout, exclusions.

A *layer* is a MatMul, Gemm or Conv whose weight is a constant (an initializer or a Constant node):

- MatMul: activation `input[0]` [..., in], weight `input[1]` [in, out] (the TorchScript exporter
  writes `nn.Linear` as MatMul with the transposed weight, then an Add for the bias): output
  channels on axis 1;
- Gemm: `A` [n, in], `B` [out, in] with transB=1 (or [in, out] with transB=0), bias `C` stays float;
- Conv: `X` [n, c, ...], `W` [out, in/groups, ...]: output channels on axis 0.

MatMuls whose two inputs are both activations (attention's Q·K^T and softmax·V) are not layers:
TensorRT keeps them (and Softmax) in high precision for int8.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

#: Node-name patterns excluded by default: conditioning embeddings, patch embedding, final layers.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    r"time_text_embed",
    r"timestep",
    r"time_embed",
    r"time_emb_proj",
    r"add_embedding",
    r"context_embedder",
    r"caption_projection",
    r"pos_embed",
    r"x_embedder",
    r"conv_in",
    r"conv_out",
    r"norm_out",
    r"proj_out",
)


@dataclass(frozen=True)
class Layer:
    """A quantizable node: `activation` is its input tensor, `weight` its constant's name.

    `weight_axis` is the output-channel axis of the weight (per-channel scales run along it) and
    `input_axis` the weight's input-channel axis (SmoothQuant scales run along it; None for Conv).
    """

    node: str
    op: str
    activation: str
    weight: str
    weight_index: int
    weight_axis: int
    input_axis: int | None


class GraphIndex:
    """Producers, consumers and constants of one graph, for lookups while rewriting it.

    (onnx-graphsurgeon's `Graph` holds the same links, but SmoothQuant and Q/DQ insertion edit the
    protobuf in place; an import / export round trip would copy every weight.)
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.model = model
        self.nodes = {n.name: n for n in graph.node}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.constant_nodes = {
            n.output[0]: n for n in graph.node if n.op_type == "Constant" and any(a.name == "value" for a in n.attribute)
        }
        self.graph_outputs = {o.name for o in graph.output}
        self.graph_inputs = {i.name for i in graph.input}

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constant_nodes

    def constant(self, name: str) -> np.ndarray:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        attr = next(a for a in self.constant_nodes[name].attribute if a.name == "value")
        return numpy_helper.to_array(attr.t)


def attribute(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def find_layers(index: GraphIndex) -> list[Layer]:
    """Every quantizable MatMul/Gemm/Conv, in graph order."""
    layers = []
    for node in index.model.graph.node:
        if node.op_type == "MatMul":
            if len(node.input) == 2 and index.is_constant(node.input[1]) and not index.is_constant(node.input[0]):
                if index.constant(node.input[1]).ndim == 2:
                    layers.append(Layer(node.name, "MatMul", node.input[0], node.input[1], 1, weight_axis=1, input_axis=0))
        elif node.op_type == "Gemm":
            if attribute(node, "transA", 0) == 0 and index.is_constant(node.input[1]) and not index.is_constant(node.input[0]):
                trans_b = attribute(node, "transB", 0)
                layers.append(
                    Layer(node.name, "Gemm", node.input[0], node.input[1], 1, weight_axis=0 if trans_b else 1, input_axis=1 if trans_b else 0)
                )
        elif node.op_type == "Conv":
            if index.is_constant(node.input[1]) and not index.is_constant(node.input[0]):
                layers.append(Layer(node.name, "Conv", node.input[0], node.input[1], 1, weight_axis=0, input_axis=None))
    return layers


def attention_matmuls(index: GraphIndex) -> list[str]:
    """MatMuls whose inputs are both activations (attention score and value products)."""
    return [
        n.name
        for n in index.model.graph.node
        if n.op_type == "MatMul" and not any(index.is_constant(name) for name in n.input)
    ]


def select_layers(
    layers: Sequence[Layer], *, defaults: Iterable[str] = DEFAULT_EXCLUDES, user: Iterable[str] = (), force: Iterable[str] = ()
) -> tuple[list[Layer], dict[str, str], list[str]]:
    """Split layers into (quantized, {excluded node: reason}, user or force patterns that matched nothing).

    Excluded: names matching a default pattern; Gemms, which the exporters write for Linears over
    one vector per sample (timestep and pooled-text embeddings, AdaLN modulation): their cost is
    nothing next to the per-token layers, and their error would scale and shift every token; the first
    Conv and the last layer of the graph (the patch embedding and the final projection in every
    family); and names matching a user pattern. Names matching a `force` pattern skip the default
    rules (not the user's patterns): a way to quantize a layer the defaults protect, to measure it.
    """
    excluded: dict[str, str] = {}
    default_res = [re.compile(p) for p in defaults]
    force_res = [re.compile(p) for p in force]
    forced = {layer.node for layer in layers if any(r.search(layer.node) for r in force_res)}
    for layer in layers:
        hit = next((r.pattern for r in default_res if r.search(layer.node)), None)
        if layer.node in forced:
            continue
        if hit:
            excluded[layer.node] = f"default pattern {hit!r}"
        elif layer.op == "Gemm":
            excluded[layer.node] = "per-sample projection (Gemm)"
    convs = [layer for layer in layers if layer.op == "Conv"]
    if convs and convs[0].node not in forced:
        excluded.setdefault(convs[0].node, "first Conv")
    if layers and layers[-1].node not in forced:
        excluded.setdefault(layers[-1].node, "last layer")
    unmatched = [r.pattern for r in force_res if not any(r.search(layer.node) for layer in layers)]
    for pattern in user:
        regex = re.compile(pattern)
        hits = [layer.node for layer in layers if regex.search(layer.node)]
        if not hits:
            unmatched.append(pattern)
        for name in hits:
            excluded.setdefault(name, f"--exclude {pattern!r}")
    kept = [layer for layer in layers if layer.node not in excluded]
    return kept, excluded, unmatched


def tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor ONNX shape inference can type (weights' bytes are not needed).

    Polygraphy's `InferShapes` runs the same `onnx.shape_inference` on the whole model; this strips
    the large initializers' bytes first, so inference never copies the weights.
    """
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for init in skeleton.graph.initializer:  # inference reads dims, and data only of small (shape) tensors
        if int(np.prod(init.dims)) <= 64:
            continue
        init.ClearField("raw_data")
        for field in ("float_data", "int32_data", "int64_data", "double_data"):
            init.ClearField(field)
        init.ClearField("data_location")
        init.ClearField("external_data")
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
    except Exception:  # shape inference is best-effort here: unknown ranks only disable smoothing folds
        inferred = skeleton
    ranks = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    for init in model.graph.initializer:
        ranks[init.name] = len(init.dims)
    return ranks

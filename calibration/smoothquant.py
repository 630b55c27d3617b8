"""SmoothQuant for the inputs of linear layers, folded into the fp32 graph.

For an activation X [..., C] feeding linear layers W_k (input channel j), with alpha in [0, 1]:

    s_j = max|X_j|^alpha / max_k max|W_k[j, :]|^(1 - alpha)
    X W = (X diag(1/s)) (diag(s) W)

`diag(s)` goes into each consumer's weight. `1/s` is pushed upstream into constants so the graph
stays a plain graph (later a plain Q/DQ graph) with no new op on the activation itself:

- Add/Sub: into both operands; Mul: into one operand (a constant first); Div: into the numerator;
- Cast/Identity, Unsqueeze of a non-channel axis: through to their input;
- LayerNormalization: into its scale and bias; MatMul/Gemm with constant weights: into the weight's
  output channels (and the Gemm bias);
- a constant operand becomes `constant / s` (broadcast to [C]);
- a small per-sample tensor (rank <= 2, e.g. AdaLN's shift/scale [batch, C]) that cannot take it
  gets an explicit Mul by 1/s, costing batch x C multiplies.

Every tensor on the way must feed only that path. When the fold fails (the activation also feeds
another op, or comes from an op that does not commute with per-channel scaling such as a Reshape of
attention heads), the layer is not smoothed and the reason is recorded. A tanh-GELU's output is not
folded into its 0.5 either: ONNX Runtime fuses the GELU into one FastGelu kernel only with that exact
constant, and the original paper smooths only the linears that follow a LayerNorm.

Paper: Xiao et al., "SmoothQuant", ICML 2023, https://arxiv.org/abs/2211.10438
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from latentrt.calibration.graph import GraphIndex, Layer, attribute, tensor_ranks

logger = logging.getLogger(__name__)

_SCALE_RANGE = (1e-4, 1e4)
_SHAPE_ONLY = ("Shape", "Size")  # consumers that read only the shape, not the values


@dataclass(frozen=True)
class SmoothingReport:
    """Which activations were smoothed (tensor -> its layers) and which were not (tensor -> why).

    `rescaled[tensor]` lists the tensors that now hold their fp32 values divided by s per channel:
    the smoothed tensor and every tensor on the path from where 1/s was folded in down to it (a
    comparison with the fp32 graph, as `latentrt debug` makes, must not count that as error).
    """

    smoothed: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    rescaled: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "smoothed": {k: list(v) for k, v in self.smoothed.items()},
            "skipped": dict(self.skipped),
            "rescaled": {k: list(v) for k, v in self.rescaled.items()},
        }


def smoothing_scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s [C] = act^alpha / weight^(1 - alpha), 1 where either is 0, clipped to [1e-4, 1e4]."""
    act = np.asarray(act_absmax, dtype=np.float64)
    w = np.asarray(weight_absmax, dtype=np.float64)
    valid = (act > 0) & (w > 0)
    s = np.ones_like(act)
    s[valid] = act[valid] ** alpha / w[valid] ** (1.0 - alpha)
    return np.clip(s, *_SCALE_RANGE).astype(np.float32)


def smoothable_groups(index: GraphIndex, layers: Sequence[Layer]) -> tuple[dict[str, list[Layer]], dict[str, str]]:
    """Group the MatMul/Gemm layers by input tensor; a tensor qualifies when only they consume it."""
    groups: dict[str, list[Layer]] = {}
    for layer in layers:
        if layer.input_axis is not None:
            groups.setdefault(layer.activation, []).append(layer)
    kept, skipped = {}, {}
    for tensor, members in groups.items():
        names = {layer.node for layer in members}
        others = [n for n in index.consumers[tensor] if n.name not in names and n.op_type not in _SHAPE_ONLY]
        if tensor in index.graph_inputs:
            skipped[tensor] = "is a graph input (nothing upstream to fold 1/s into)"
        elif others:
            skipped[tensor] = f"also feeds {others[0].op_type} {others[0].name!r}, which would see the smoothed values"
        else:
            kept[tensor] = members
    return kept, skipped


def smooth_graph(
    model: onnx.ModelProto, layers: Sequence[Layer], channel_absmax: Mapping[str, np.ndarray], alpha: float,
    derived: dict | None = None,
) -> SmoothingReport:
    """Apply SmoothQuant to `model` in place for the given (quantized) layers.

    Args:
        layers: the layers that will be quantized (their Layer records from `find_layers(model)`).
        channel_absmax: per activation tensor, max |x| per input channel (float [C]) from calibration.
        alpha: migration strength in [0, 1].
        derived: if given, receives {new initializer: (initializer it scales, factor [C], axis)}
            for every constant rewritten here as `old * factor` along `axis` (the weight map of
            the quantized bundle follows it, for LoRA).

    Returns:
        a report; the layers' weights and the folded constants are replaced by new initializers,
        so call `find_layers` again for the new weight names.
    """
    index = GraphIndex(model)
    groups, skipped = smoothable_groups(index, layers)
    ranks = tensor_ranks(model)
    names = (f"smoothquant_{i}" for i in itertools.count())
    inserts: dict[str, list[onnx.NodeProto]] = {}
    smoothed: dict[str, list[str]] = {}
    rescaled: dict[str, list[str]] = {}
    for tensor, members in groups.items():
        if tensor not in channel_absmax:
            skipped[tensor] = "no per-channel statistics were collected for it"
            continue
        act = np.asarray(channel_absmax[tensor], dtype=np.float32)
        weights = [index.constant(layer.weight) for layer in members]
        if any(w.shape[layer.input_axis] != act.size for w, layer in zip(weights, members)):
            skipped[tensor] = f"its channel count {act.size} does not match the weights' input channels"
            continue
        planner = _FoldPlanner(index, ranks, channels=act.size)
        actions = planner.plan_output(index.producer[tensor])
        if actions is None:
            producer = index.producer[tensor]
            skipped[tensor] = f"its producer {producer.op_type} {producer.name!r} cannot absorb 1/s (no foldable path upstream)"
            continue
        w_absmax = np.max([np.abs(w).max(axis=1 - layer.input_axis) for w, layer in zip(weights, members)], axis=0)
        s = smoothing_scales(act, w_absmax, alpha)
        inv = (1.0 / s).astype(np.float32)
        rescaled[tensor] = _path_to(index, actions, tensor)
        for action in actions:
            _apply(model, index, action, inv, names, inserts, derived)
        for w, layer in zip(weights, members):
            node = index.nodes[layer.node]
            shape = [1, 1]
            shape[layer.input_axis] = -1
            source = node.input[layer.weight_index]
            node.input[layer.weight_index] = _add_initializer(model, next(names), (w * s.reshape(shape)).astype(w.dtype))
            if derived is not None:
                derived[node.input[layer.weight_index]] = (source, s, layer.input_axis)
        smoothed[tensor] = [layer.node for layer in members]
        index = GraphIndex(model)  # constants and wiring changed
    if inserts:
        ordered = []
        for node in model.graph.node:
            ordered.extend(inserts.get(node.name, ()))
            ordered.append(node)
        del model.graph.node[:]
        model.graph.node.extend(ordered)
    prune_unused(model)
    return SmoothingReport(smoothed=smoothed, skipped=skipped, rescaled=rescaled)


def _path_to(index: GraphIndex, actions: list, tensor: str) -> list[str]:
    """The tensors from the nodes that absorb 1/s down to `tensor`, in graph order: every tensor on
    a fold path has a single consumer (`_FoldPlanner.plan_edge`), so each path is one chain."""
    found: set[str] = set()
    for action in actions:
        name = action[1].output[0]
        for _ in range(len(index.model.graph.node)):
            found.add(name)
            if name == tensor or len(index.consumers[name]) != 1:
                break
            name = index.consumers[name][0].output[0]
    order = {out: i for i, node in enumerate(index.model.graph.node) for out in node.output}
    return sorted(found, key=lambda t: order.get(t, -1))


class _FoldPlanner:
    """Plans where a per-channel factor v on a tensor's last axis can be absorbed upstream.

    Actions: ("const", node, input_index, mode) multiplies a constant input by v ("last": broadcast
    on the last axis, "cols": a [in, out] weight's columns, "rows": a [out, in] weight's rows);
    ("mul", node, input_index) inserts a Mul by v on that edge.
    """

    def __init__(self, index: GraphIndex, ranks: Mapping[str, int], channels: int) -> None:
        self.index = index
        self.ranks = ranks
        self.channels = channels

    def plan_output(self, node: onnx.NodeProto) -> list | None:
        op = node.op_type
        index = self.index
        if len(node.output) != 1:
            return None
        if op in ("Add", "Sub"):
            a, b = self.plan_edge(node, 0), self.plan_edge(node, 1)
            return None if a is None or b is None else a + b
        if op == "Mul":
            if _is_tanh_gelu_output(index, node):
                return None
            for i in sorted((0, 1), key=lambda i: not index.is_constant(node.input[i])):
                plan = self.plan_edge(node, i)
                if plan is not None:
                    return plan
            return None
        if op == "Div":
            return self.plan_edge(node, 0)
        if op == "Identity" or (op == "Cast" and attribute(node, "to") == onnx.TensorProto.FLOAT):
            return self.plan_edge(node, 0)
        if op == "Unsqueeze":
            rank = self.ranks.get(node.output[0])
            if rank is None:
                return None
            axes = attribute(node, "axes")
            if axes is None:
                if len(node.input) < 2 or not index.is_constant(node.input[1]):
                    return None
                axes = index.constant(node.input[1]).tolist()
            if any(a % rank == rank - 1 for a in axes):
                return None
            return self.plan_edge(node, 0)
        if op == "LayerNormalization":
            rank = self.ranks.get(node.input[0])
            axis = attribute(node, "axis", -1)
            if not (axis == -1 or (rank is not None and axis == rank - 1)):
                return None
            plan = []
            for i in (1, 2):
                if i < len(node.input) and node.input[i]:
                    if not self._const_ok(node.input[i]):
                        return None
                    plan.append(("const", node, i, "last"))
            return plan
        if op == "MatMul":
            if index.is_constant(node.input[1]) and index.constant(node.input[1]).ndim == 2:
                return [("const", node, 1, "cols")]
            return None
        if op == "Gemm":
            if attribute(node, "transA", 0) or not index.is_constant(node.input[1]):
                return None
            plan = [("const", node, 1, "rows" if attribute(node, "transB", 0) else "cols")]
            if len(node.input) > 2 and node.input[2]:
                bias = self.plan_edge(node, 2)
                if bias is None:
                    return None
                plan += bias
            return plan
        return None

    def plan_edge(self, node: onnx.NodeProto, i: int) -> list | None:
        """Plan dividing input `i` of `node`, as that node sees it, by s."""
        index = self.index
        tensor = node.input[i]
        if index.is_constant(tensor):
            return [("const", node, i, "last")] if self._const_ok(tensor) else None
        producer = index.producer.get(tensor)
        private = (
            producer is not None
            and tensor not in index.graph_outputs
            and len(index.consumers[tensor]) == 1
        )
        plan = self.plan_output(producer) if private else None
        if plan is not None:
            return plan
        rank = self.ranks.get(tensor)
        if rank is not None and 1 <= rank <= 2:
            return [("mul", node, i)]
        return None

    def _const_ok(self, name: str) -> bool:
        value = self.index.constant(name)
        return value.dtype == np.float32 and (value.ndim == 0 or value.shape[-1] in (1, self.channels))


def _is_tanh_gelu_output(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """`node` is the last Mul of `(x * 0.5) * (1 + tanh(...))`."""
    for name in node.input:
        add = index.producer.get(name)
        if add is not None and add.op_type == "Add" and any(
            index.producer.get(i) is not None and index.producer[i].op_type == "Tanh" for i in add.input
        ):
            return True
    return False


def _apply(model: onnx.ModelProto, index: GraphIndex, action: tuple, v: np.ndarray, names, inserts: dict, derived: dict | None = None) -> None:
    if action[0] == "const":
        _, node, i, mode = action
        value = index.constant(node.input[i])
        if mode == "cols":
            scaled, axis = value * v[None, :], 1
        elif mode == "rows":
            scaled, axis = value * v[:, None], 0
        else:
            scaled, axis = value * v, value.ndim - 1  # broadcasts a scalar or [..., 1] constant to [..., C]
        source = node.input[i]
        node.input[i] = _add_initializer(model, next(names), scaled.astype(np.float32))
        if derived is not None and scaled.shape == value.shape:
            derived[node.input[i]] = (source, v, axis)
    else:
        _, node, i = action
        factor = _add_initializer(model, next(names), v)
        out = next(names)
        mul = onnx.helper.make_node("Mul", [node.input[i], factor], [out], name=f"/smoothquant/{out}")
        node.input[i] = out
        inserts.setdefault(node.name, []).append(mul)


def _add_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> str:
    model.graph.initializer.append(numpy_helper.from_array(np.require(value, requirements="C"), name))
    return name


def prune_unused(model: onnx.ModelProto) -> None:
    """Drop initializers and Constant nodes that nothing reads any more.

    Narrower than onnx-graphsurgeon's `Graph.cleanup()` (no other node is removed) and done in place:
    the round trip through onnx-graphsurgeon would rebuild every weight of the graph being quantized.
    """
    graph = model.graph
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    kept = [init for init in graph.initializer if init.name in used]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)

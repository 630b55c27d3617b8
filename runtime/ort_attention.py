"""Attention as one ONNX Runtime kernel: PyTorch's exported SDPA -> com.microsoft.MultiHeadAttention.

The bundle's ONNX stays standard (TensorRT reads it). PyTorch writes `F.scaled_dot_product_attention`
without a mask as

    Qh = Transpose(Reshape(q, [b, -1, H, D]), [0, 2, 1, 3])        (or a Concat on axis 2 of several,
    Kh, Vh likewise                                                  as SD3's joint attention writes it)
    s  = Sqrt(Cast(Div(1, Sqrt(Cast(Slice(Shape(Qh), -1))))))       (sqrt of the default 1/sqrt(D))
    P  = Softmax(MatMul(Mul(Qh, s), Mul(Transpose(Kh, [0, 1, 3, 2]), s)))
    y  = Reshape(Transpose(MatMul(P, Vh), [0, 2, 1, 3]), [b, -1, H * D])

ONNX Runtime's CPU provider runs that as ~12 kernels with the [b, H, S, S] scores in memory.
`MultiHeadAttention(q, k, v)` on the [b, S, H * D] projections (concatenated along the tokens) is
one kernel with the same default scale (bench-sd3 denoiser: 68.4 -> 59.9 ms a call, outputs within
1e-6). `fuse_attention` rewrites every occurrence that matches exactly and leaves the rest (masked,
causal, rotary or explicitly scaled attention) as it is.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

MAX_INLINE_BYTES = 1 << 31  # larger models keep their weights in external data; they are not rewritten


class _Graph:
    def __init__(self, graph) -> None:
        from onnx import numpy_helper

        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.constants = {t.name: t for t in graph.initializer}
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.constants[n.output[0]] = n.attribute[0].t
        self._to_array = numpy_helper.to_array

    def op(self, name: str, op_type: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_consumer(self, name: str, op_type: str):
        readers = self.consumers.get(name, [])
        return readers[0] if len(readers) == 1 and readers[0].op_type == op_type else None

    def constant(self, name: str):
        t = self.constants.get(name)
        return None if t is None else self._to_array(t)


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _heads(g: _Graph, tensor: str) -> tuple[list[str], int] | None:
    """`tensor` = Transpose(Reshape(x, [b, -1, H, D]), [0, 2, 1, 3]) or a Concat(axis 2) of those:
    the token-major inputs [x...] and H."""
    concat = g.op(tensor, "Concat")
    parts = list(concat.input) if concat is not None and _attr(concat, "axis") in (2, -2) else [tensor]
    sources, heads = [], set()
    for part in parts:
        transpose = g.op(part, "Transpose")
        reshape = g.op(transpose.input[0], "Reshape") if transpose is not None else None
        if reshape is None or list(_attr(transpose, "perm", [])) != [0, 2, 1, 3]:
            return None
        shape = g.op(reshape.input[1], "Concat")
        h = g.constant(shape.input[2]) if shape is not None and len(shape.input) == 4 else None
        if h is None or h.size != 1:
            return None
        sources.append(reshape.input[0])
        heads.add(int(h.reshape(-1)[0]))
    return (sources, heads.pop()) if len(heads) == 1 else None


def _is_default_scale(g: _Graph, scale: str, query: str) -> bool:
    """`scale` = Sqrt(Cast?(Div(1, Sqrt(Cast?(Slice(Shape(query), last)))))): PyTorch's sqrt(1/sqrt(D))."""
    chain = g.op(scale, "Sqrt")
    name = chain.input[0] if chain is not None else None
    if name is not None and g.op(name, "Cast") is not None:
        name = g.producer[name].input[0]
    div = g.op(name, "Div") if name is not None else None
    one = g.constant(div.input[0]) if div is not None else None
    if one is None or one.size != 1 or float(one.reshape(-1)[0]) != 1.0:
        return False
    root = g.op(div.input[1], "Sqrt")
    name = root.input[0] if root is not None else None
    if name is not None and g.op(name, "Cast") is not None:
        name = g.producer[name].input[0]
    sliced = g.op(name, "Slice") if name is not None else None
    shape = g.op(sliced.input[0], "Shape") if sliced is not None else None
    start = g.constant(sliced.input[1]) if sliced is not None else None
    return shape is not None and shape.input[0] == query and start is not None and int(start.reshape(-1)[0]) == -1


def fuse_attention(model) -> int:
    """Rewrite each matching attention in `model` (in place); returns how many. See the module docstring."""
    from onnx import helper

    g = _Graph(model.graph)
    replacements: dict[int, list] = {}
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax"]:
        if _attr(softmax, "axis", -1) not in (-1, 3):
            continue
        scores = g.op(softmax.input[0], "MatMul")
        qmul = g.op(scores.input[0], "Mul") if scores is not None else None
        kmul = g.op(scores.input[1], "Mul") if scores is not None else None
        if qmul is None or kmul is None:
            continue
        ktrans = g.op(kmul.input[0], "Transpose")
        context = g.only_consumer(softmax.output[0], "MatMul")
        out_t = g.only_consumer(context.output[0], "Transpose") if context is not None else None
        out_r = g.only_consumer(out_t.output[0], "Reshape") if out_t is not None else None
        if ktrans is None or list(_attr(ktrans, "perm", [])) != [0, 1, 3, 2] or out_r is None or context.input[0] != softmax.output[0]:
            continue
        if list(_attr(out_t, "perm", [])) != [0, 2, 1, 3]:
            continue
        if not (_is_default_scale(g, qmul.input[1], qmul.input[0]) and _is_default_scale(g, kmul.input[1], qmul.input[0])):
            continue
        q, k, v = _heads(g, qmul.input[0]), _heads(g, ktrans.input[0]), _heads(g, context.input[1])
        if q is None or k is None or v is None or len({q[1], k[1], v[1]}) != 1 or len(k[0]) != len(v[0]):
            continue
        prefix = softmax.name or softmax.output[0]
        nodes, inputs = [], []
        for which, (sources, _) in zip("qkv", (q, k, v)):
            if len(sources) == 1:
                inputs.append(sources[0])
            else:
                nodes.append(helper.make_node("Concat", sources, [f"{prefix}/mha_{which}"], axis=1, name=f"{prefix}/mha_{which}"))
                inputs.append(f"{prefix}/mha_{which}")
        nodes.append(
            helper.make_node("MultiHeadAttention", inputs, list(out_r.output), domain="com.microsoft", num_heads=q[1], name=f"{prefix}/mha")
        )
        replacements[id(out_r)] = nodes
    if not replacements:
        return 0
    order = []
    for node in model.graph.node:
        order.extend(replacements.get(id(node), [node]))
    del model.graph.node[:]
    model.graph.node.extend(order)
    _drop_dead_nodes(model.graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replacements)


def _drop_dead_nodes(graph) -> None:
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        live = [n for n in graph.node if any(o in used for o in n.output)]
        if len(live) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(live)


def with_fused_attention(path: str | os.PathLike, scratch: str | os.PathLike) -> Path | None:
    """A copy of the model at `path` with its attention fused, written into `scratch`; None when
    nothing matched, the model keeps weights in external data, or `onnx` is not installed."""
    path = Path(path)
    if path.stat().st_size > MAX_INLINE_BYTES or (path.parent / (path.name + ".data")).exists():
        return None
    try:
        import onnx
    except ImportError:
        log.debug("onnx is not installed; attention stays unfused for ONNX Runtime")
        return None
    model = onnx.load(str(path))
    fused = fuse_attention(model)
    if not fused:
        return None
    out = Path(tempfile.mkstemp(suffix=".onnx", dir=scratch)[1])
    # Tensor by tensor into a data file: no second in-memory copy of the weights while writing.
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=out.name + ".data")
    log.debug("%s: %d attention blocks run as MultiHeadAttention", path.name, fused)
    return out

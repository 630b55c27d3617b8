"""ONNX rewrites applied to every traced graph before validation.

Each pass keeps the graph's function (validation against PyTorch checks that) and removes a
construct that a backend handles badly.
"""

from __future__ import annotations

import numpy as np


def fold_squeeze_ifs(model) -> None:
    """Replace `If(dim == 1) {Squeeze} else {Identity}` by Identity when only Reshapes read the result.

    The TorchScript exporter writes `x.squeeze(k)` on a dynamic dim as that If, which TensorRT
    rejects (it checks both branches). A Reshape to an explicit shape gives the same tensor whether
    or not a size-1 axis was squeezed first (PixArt's unpatchify reshapes right after its squeeze).
    """
    import onnx

    graph = model.graph
    consumers: dict[str, list] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    graph_outputs = {o.name for o in graph.output}
    for node in list(graph.node):
        if node.op_type != "If" or len(node.output) != 1:
            continue
        branches = {a.name: [n.op_type for n in a.g.node] for a in node.attribute}
        if branches.get("then_branch", [])[-1:] != ["Squeeze"] or branches.get("else_branch") != ["Identity"]:
            continue
        out = node.output[0]
        if out in graph_outputs or not all(c.op_type == "Reshape" and c.input[0] == out for c in consumers.get(out, [])):
            continue
        source = next(a.g for a in node.attribute if a.name == "else_branch").node[0].input[0]
        index = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(index, onnx.helper.make_node("Identity", [source], [out], name=node.name + "/folded"))


def integer_ranges(model) -> None:
    """Rewrite float `Range(start, limit, 1)` with a constant integer start as Cast(Range over int64).

    TensorRT-RTX's Myelin compiler rejects float Range ops (the sinusoidal position embeddings of
    PixArt write `arange(n, dtype=float32)`); with delta 1 and an integer start, the int64 Range from
    `start` to `ceil(limit)` has the same elements.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            constants[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    nodes = []
    for n in graph.node:
        start, delta = constants.get(n.input[0]) if n.op_type == "Range" else None, constants.get(n.input[2]) if n.op_type == "Range" else None
        if (
            n.op_type == "Range"
            and start is not None
            and delta is not None
            and start.dtype == np.float32
            and float(delta) == 1.0
            and float(start).is_integer()
        ):
            p = n.name or n.output[0]
            int64 = onnx.TensorProto.INT64
            nodes += [
                onnx.helper.make_node("Constant", [], [f"{p}/start_i"], value=numpy_helper.from_array(np.array(int(start), np.int64))),
                onnx.helper.make_node("Constant", [], [f"{p}/delta_i"], value=numpy_helper.from_array(np.array(1, np.int64))),
                onnx.helper.make_node("Ceil", [n.input[1]], [f"{p}/limit_ceil"]),
                onnx.helper.make_node("Cast", [f"{p}/limit_ceil"], [f"{p}/limit_i"], to=int64),
                onnx.helper.make_node("Range", [f"{p}/start_i", f"{p}/limit_i", f"{p}/delta_i"], [f"{p}/range_i"], name=p),
                onnx.helper.make_node("Cast", [f"{p}/range_i"], list(n.output), to=onnx.TensorProto.FLOAT, name=p + "/to_float"),
            ]
        else:
            nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)


def fuse_parallel_matmuls(model) -> int:
    """Merge MatMuls that read the same activation with constant weights into one MatMul + Split.

    Attention's Q, K and V projections (and the K, V of cross-attention) are three GEMMs over one
    input: as one GEMM with the weights concatenated along N, the input is read once, the GEMM is
    wider, and a quantized graph gets one Q/DQ pair on that input (ONNX Runtime only turns
    `DQ -> MatMul` into an int8 `MatMulIntegerToFloat` when the quantized input has a single consumer).
    A bias `Add` that follows every MatMul of a group is merged the same way. Returns the number of
    groups fused.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    uses: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            uses.setdefault(name, []).append(n)
    graph_outputs = {o.name for o in graph.output}

    def constant_weight(node):
        w = weights.get(node.input[1])
        if node.op_type != "MatMul" or w is None or len(w.dims) != 2 or len(uses[w.name]) != 1:
            return None
        return w

    def bias_add(node, width: int):
        """The `Add(matmul, bias[width])` that alone consumes `node`'s output, and the bias's name."""
        out = node.output[0]
        readers = uses.get(out, [])
        if out in graph_outputs or len(readers) != 1 or readers[0].op_type != "Add":
            return None
        add = readers[0]
        other = add.input[1] if add.input[0] == out else add.input[0]
        b = weights.get(other)
        if b is None or list(b.dims) != [width] or len(uses[other]) != 1:
            return None
        return add, other

    groups = []
    for source, readers in uses.items():
        group = [n for n in readers if n.op_type == "MatMul" and n.input[0] == source and constant_weight(n) is not None]
        group = [n for n in group if weights[n.input[1]].data_type == weights[group[0].input[1]].data_type]
        if len(group) >= 2 and len({weights[n.input[1]].dims[0] for n in group}) == 1:
            groups.append(group)

    replaced: set[int] = set()
    new_nodes: dict[int, list] = {}
    dropped: set[str] = set()
    for group in groups:
        ws = [numpy_helper.to_array(weights[n.input[1]]) for n in group]
        widths = [w.shape[1] for w in ws]
        adds = [bias_add(n, w) for n, w in zip(group, widths)]
        with_bias = all(a is not None for a in adds)
        base = group[0].name or group[0].output[0]
        fused_w = numpy_helper.from_array(np.concatenate(ws, axis=1), base + "/fused_weight")
        nodes = [helper.make_node("MatMul", [group[0].input[0], fused_w.name], [base + "/fused_matmul"], name=base + "/fused")]
        graph.initializer.append(fused_w)
        dropped.update(n.input[1] for n in group)
        split_in, outputs = base + "/fused_matmul", [n.output[0] for n in group]
        if with_bias:
            bs = [numpy_helper.to_array(weights[name]) for _, name in adds]
            fused_b = numpy_helper.from_array(np.concatenate(bs), base + "/fused_bias")
            graph.initializer.append(fused_b)
            nodes.append(helper.make_node("Add", [split_in, fused_b.name], [base + "/fused_add"], name=base + "/fused_add"))
            split_in, outputs = base + "/fused_add", [add.output[0] for add, _ in adds]
            dropped.update(name for _, name in adds)
            for add, _ in adds:
                replaced.add(id(add))
        sizes = numpy_helper.from_array(np.array(widths, np.int64), base + "/split_sizes")
        graph.initializer.append(sizes)
        nodes.append(helper.make_node("Split", [split_in, sizes.name], outputs, name=base + "/split", axis=-1))
        for n in group:
            replaced.add(id(n))
        new_nodes[id(group[0])] = nodes

    if not groups:
        return 0
    order = []
    for n in graph.node:
        if id(n) in new_nodes:
            order.extend(new_nodes[id(n)])
        elif id(n) not in replaced:
            order.append(n)
    # The fused nodes take the place of the group's first MatMul: every member and bias Add came after it
    # and read an input defined before it, so the order stays topological.
    del graph.node[:]
    graph.node.extend(order)
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return len(groups)

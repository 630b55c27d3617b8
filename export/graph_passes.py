"""ONNX rewrites applied to every traced graph before validation.

Each pass keeps the graph's function (validation against PyTorch checks that) and removes a
construct that a backend handles badly.
"""

from __future__ import annotations

import numpy as np
import onnx

from latentrt.export.weights import Recipe
from latentrt.graph.view import GraphView, drop_dead, used_names, weightless


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
    view = GraphView(graph)  # constants read on lookup: the weights are not copied
    nodes = []
    for n in graph.node:
        start, delta = (view.constant(n.input[0]), view.constant(n.input[2])) if n.op_type == "Range" else (None, None)
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


def fuse_parallel_matmuls(model, recipes: dict | None = None) -> int:
    """Merge MatMuls that read the same activation with constant weights into one MatMul + Split.

    Attention's Q, K and V projections (and the K, V of cross-attention) are three GEMMs over one
    input: as one GEMM with the weights concatenated along N, the input is read once, the GEMM is
    wider, and a quantized graph gets one Q/DQ pair on that input (ONNX Runtime only turns
    `DQ -> MatMul` into an int8 `MatMulIntegerToFloat` when the quantized input has a single consumer).
    A bias `Add` that follows every MatMul of a group is merged the same way. Returns the number of
    groups fused.

    `recipes` (initializer name -> Recipe over the checkpoint, export/weights.py) are composed for
    the fused weights; weights whose data is absent (read from the checkpoint later) are fused
    through their recipes alone.
    """
    from onnx import helper, numpy_helper

    recipes = {} if recipes is None else recipes

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
    def concat(names: list[str], new_name: str, axis: int):
        """The initializer concatenating `names` along `axis`, with its data (when every part has
        data) and its composed recipe (when every part has one); None when neither can be made."""
        tensors = [weights[n] for n in names]
        with_data = [has_data(t) for t in tensors]
        if any(with_data) and not all(with_data):
            return None
        parts = [recipes.get(n) for n in names]
        if all(p is not None and (len(p.parts) == 1 or p.axis % len(p.shape) == axis % len(p.shape)) for p in parts):
            shape = list(tensors[0].dims)
            shape[axis] = sum(t.dims[axis] for t in tensors)
            sizes = tuple(s for p, t in zip(parts, tensors) for s in (p.sizes if len(p.parts) > 1 else (t.dims[axis],)))
            recipes[new_name] = Recipe(tuple(x for p in parts for x in p.parts), tuple(shape), axis % len(shape), sizes=sizes)
        elif not all(with_data):
            return None
        if all(with_data):
            return numpy_helper.from_array(np.concatenate([numpy_helper.to_array(t) for t in tensors], axis=axis), new_name)
        shape = list(recipes[new_name].shape)
        return onnx.TensorProto(name=new_name, data_type=tensors[0].data_type, dims=shape, data_location=onnx.TensorProto.EXTERNAL)

    for group in groups:
        widths = [weights[n.input[1]].dims[1] for n in group]
        adds = [bias_add(n, w) for n, w in zip(group, widths)]
        with_bias = all(a is not None for a in adds)
        base = group[0].name or group[0].output[0]
        fused_w = concat([n.input[1] for n in group], base + "/fused_weight", 1)
        fused_b = concat([name for _, name in adds], base + "/fused_bias", 0) if with_bias else None
        if fused_w is None or (with_bias and fused_b is None):
            continue
        nodes = [helper.make_node("MatMul", [group[0].input[0], fused_w.name], [base + "/fused_matmul"], name=base + "/fused")]
        graph.initializer.append(fused_w)
        dropped.update(n.input[1] for n in group)
        split_in, outputs = base + "/fused_matmul", [n.output[0] for n in group]
        if with_bias:
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

    if not new_nodes:
        return 0
    for name in dropped:
        recipes.pop(name, None)
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
    for i in reversed(range(len(graph.initializer))):  # in place: extend() would copy every weight
        if graph.initializer[i].name in dropped:
            del graph.initializer[i]
    return len(new_nodes)


_VIEWS = {"Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}


def fold_weight_views(model, recipes: dict) -> int:
    """Fold the views exporters put between a weight and its consumer (a Linear's Transpose, a
    bias's Unsqueeze) into the weight's recipe, for weights whose data is read from the checkpoint
    later; returns the number of nodes folded. The result is the graph a constant-folding exporter
    writes, with each weight still known by the checkpoint tensor it comes from."""
    from onnx import numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    constants = {t.name: t for t in graph.initializer if has_data(t)}
    constants |= {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    kept, folded = [], 0
    for node in graph.node:
        source = weights.get(node.input[0]) if node.input else None
        recipe = recipes.get(node.input[0]) if source is not None and not has_data(source) else None
        shape = None
        if recipe is not None and node.op_type in _VIEWS and node.output[0] not in outputs:
            const = [numpy_helper.to_array(constants[i]) if i in constants else None for i in node.input[1:]]
            shape = _view_shape(node, tuple(source.dims), const)
        new = recipe.viewed(node.op_type, shape) if shape is not None else None
        if new is None:
            kept.append(node)
            continue
        tensor = onnx.TensorProto(name=node.output[0], data_type=source.data_type, dims=list(shape), data_location=onnx.TensorProto.EXTERNAL)
        graph.initializer.append(tensor)
        weights[tensor.name] = tensor
        recipes[tensor.name] = new
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
        drop_dead(graph)
    return folded


def _view_shape(node, shape: tuple[int, ...], const: list) -> tuple[int, ...] | None:
    """The output shape of a view node on a tensor of `shape`, None when it is not a plain view
    (an input that is not constant, a Transpose other than 2-D [1, 0])."""
    attrs = {a.name: (a.ints if a.ints else a.i) for a in node.attribute}
    if any(c is None for c in const):
        return None
    if node.op_type == "Identity":
        return shape
    if node.op_type == "Transpose":
        return shape[::-1] if len(shape) == 2 and list(attrs.get("perm", [1, 0])) == [1, 0] else None
    if node.op_type == "Flatten":
        axis = attrs.get("axis", 1) % max(len(shape), 1)
        return (int(np.prod(shape[:axis])), int(np.prod(shape[axis:])))
    if node.op_type == "Reshape":
        if not const or attrs.get("allowzero", 0):
            return None
        target = [shape[i] if d == 0 else int(d) for i, d in enumerate(np.ravel(const[0]))]
        if target.count(-1) == 1:
            known = int(np.prod([d for d in target if d != -1]))
            target[target.index(-1)] = int(np.prod(shape)) // max(known, 1)
        return tuple(target) if int(np.prod(target)) == int(np.prod(shape)) else None
    axes = [int(a) for a in np.ravel(const[0])] if const else list(attrs.get("axes", []))
    if node.op_type == "Unsqueeze":
        out = list(shape)
        for a in sorted(a % (len(shape) + len(axes)) for a in axes):
            out.insert(a, 1)
        return tuple(out)
    if node.op_type == "Squeeze":
        drop = {a % len(shape) for a in axes} if axes else {i for i, d in enumerate(shape) if d == 1}
        return tuple(d for i, d in enumerate(shape) if i not in drop)
    return None


# Ops evaluated at export when all their inputs are constant: shape arithmetic and small math.
# Ops that create tensors from sizes (ConstantOfShape, Expand, Tile, Range) are left to the backend.
_FOLDABLE = {
    "Abs", "Add", "And", "Cast", "Ceil", "Concat", "Constant", "Div", "Equal", "Floor", "Gather", "Greater", "Identity",
    "Less", "Max", "Min", "Mod", "Mul", "Neg", "Not", "Or", "Reshape", "Shape", "Size", "Slice", "Sqrt",
    "Squeeze", "Sub", "Transpose", "Unsqueeze", "Where",
}
_FOLD_MAX_ELEMENTS = 1024


def fold_static_shapes(model) -> int:
    """Turn arithmetic on static sizes into constants; returns the number of nodes removed.

    The TorchScript exporter computes every size at run time from `Shape`, even where the dim is
    static: diffusers' `emb.chunk(6, dim=1)` in each AdaLN reads the width through Shape -> Gather
    -> Add -> Div -> Mul before every Slice, and attention computes `1 / sqrt(head_dim)` from the
    query's shape. ONNX Runtime runs all of it on each call (on the demo denoiser a third of the
    nodes) and cannot fold it, since the inputs' shapes are dynamic. Here the dims come from ONNX
    shape inference: a `Shape` (or a `Gather` / `Slice` of one) whose selected dims are all static
    becomes a constant, and every node of `_FOLDABLE` whose inputs are constants is evaluated with
    the ONNX reference implementation. Dims that depend on a dynamic axis are never folded; the
    validation at sizes other than the traced ones checks the result.
    """
    removed = 0
    # A fold can make more dims static (a Reshape whose target became constant): repeat until none.
    while (count := _fold_once(model)) > 0:
        removed += count
    return removed


def _fold_once(model) -> int:
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    dims = _inferred_dims(model)
    constants: dict[str, np.ndarray] = {}
    for t in _small_initializers(graph):
        constants[t.name] = numpy_helper.to_array(t)
    partial: dict[str, list[int | None]] = {}  # Shape outputs with some static dims
    graph_outputs = {o.name for o in graph.output}
    folded: set[str] = set()  # outputs turned into constants by this pass

    for node in graph.node:
        if any(o in graph_outputs for o in node.output) or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        value = None
        if node.op_type == "Shape" and node.input[0] in dims:
            attrs = {a.name: a.i for a in node.attribute}
            rank = len(dims[node.input[0]])
            selected = dims[node.input[0]][slice(attrs.get("start", 0), attrs.get("end", rank))]
            if all(d is not None for d in selected):
                value = np.array(selected, np.int64)
            else:
                partial[node.output[0]] = selected
        elif node.op_type in ("Gather", "Slice") and node.input[0] in partial and all(i in constants for i in node.input[1:] if i):
            picked = _pick(partial[node.input[0]], node, [constants.get(i) for i in node.input[1:]])
            if picked is not None and all(d is not None for d in np.ravel(picked)):
                value = np.asarray(picked, np.int64)
        elif node.op_type in _FOLDABLE and node.domain in ("", "ai.onnx") and all(i in constants for i in node.input if i):
            inputs = [i for i in node.input if i]
            mini = helper.make_model(
                helper.make_graph(
                    [node], "fold", [], [helper.make_empty_tensor_value_info(o) for o in node.output],
                    [numpy_helper.from_array(constants[i], i) for i in dict.fromkeys(inputs)],
                ),
                opset_imports=list(model.opset_import),
            )
            try:
                results = ReferenceEvaluator(mini).run(None, {})
            except Exception:  # the reference implementation lacks this op or type: left to the backend
                continue
            if all(np.asarray(r).size <= _FOLD_MAX_ELEMENTS for r in results):
                for name, r in zip(node.output, results):
                    constants[name] = np.asarray(r)
                    if node.op_type != "Constant":  # a Constant stays as it is; unread, it is dropped
                        folded.add(name)
            continue
        if value is not None:
            constants[node.output[0]] = value
            folded.add(node.output[0])

    if not folded:
        return 0
    before = len(graph.node)
    kept = [n for n in graph.node if not (n.output and all(o in folded for o in n.output))]
    del graph.node[:]
    graph.node.extend(kept)
    existing = {t.name for t in graph.initializer}
    used = used_names(graph)
    graph.initializer.extend(
        numpy_helper.from_array(constants[name], name) for name in sorted(folded) if name in used and name not in existing
    )
    drop_dead(graph)
    return before - len(graph.node)


def _pick(shape: list[int | None], node, constant_inputs: list) -> list | None:
    """The dims a Gather or Slice selects from a partly known shape vector, None if not decidable."""
    if node.op_type == "Gather":
        index = np.asarray(constant_inputs[0])
        if index.dtype == object or np.any(index >= len(shape)) or np.any(index < -len(shape)):
            return None
        return np.array(shape, dtype=object)[index]
    starts, ends = constant_inputs[0], constant_inputs[1]
    axes = constant_inputs[2] if len(constant_inputs) > 2 else None
    steps = constant_inputs[3] if len(constant_inputs) > 3 else None
    if starts is None or ends is None or (axes is not None and list(np.ravel(axes)) not in ([0], [-1])):
        return None
    step = 1 if steps is None else int(np.ravel(steps)[0])
    return shape[slice(int(np.ravel(starts)[0]), int(np.ravel(ends)[0]), step)]


def _inferred_dims(model) -> dict[str, list[int | None]]:
    """Every tensor's dims after ONNX shape inference (None where not static).

    Inference runs on a copy without the large weights (declared as inputs of their shape), so
    models over protobuf's 2 GB limit work, and data propagation sees the small constants.
    """
    import onnx

    small = {t.name for t in _small_initializers(model.graph)}
    skeleton = weightless(model, keep=lambda t: t.name in small)
    inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True).graph
    dims = {}
    for value in list(inferred.input) + list(inferred.value_info) + list(inferred.output):
        shape = value.type.tensor_type.shape
        if value.type.tensor_type.HasField("shape"):
            dims[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    return dims


def has_data(tensor) -> bool:
    """Whether an initializer holds its data (in the proto or in an external file it names)."""
    import onnx

    return tensor.data_location != onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0


def _small_initializers(graph) -> list:
    import onnx

    return [t for t in graph.initializer if np.prod(t.dims) <= _FOLD_MAX_ELEMENTS and t.data_location != onnx.TensorProto.EXTERNAL]


def split_sequences(model) -> int:
    """Replace `SplitToSequence` read only by `SequenceAt` at constant positions by a `Split`;
    returns the number replaced.

    The dynamo exporter writes `x.chunk(n, dim)` / `x.split(size, dim)` that way when its own
    optimizer is off (it is: the optimizer would fold the placeholder weights into constants).
    TensorRT's parser has no sequence ops, and precision conversion cannot type a sequence's
    elements. The number of pieces comes from the split sizes, or for one chunk size from the
    split dim, which shape inference must know (a Linear's output width: always static); sizes
    computed at run time (Flux's text / image split of the joint attention) stay an input.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in _small_initializers(graph)}
    constants |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"}
    readers: dict[str, list] = {}
    for n in graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    dims = None
    replaced = 0
    sequences = set()
    for node in list(graph.node):
        if node.op_type != "SplitToSequence" or len(node.input) < 2:
            continue
        users = readers.get(node.output[0], [])
        if not users or any(u.op_type != "SequenceAt" or u.input[1] not in constants for u in users):
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        dims = dims if dims is not None else _inferred_dims(model)
        sizes_name = node.input[1]
        if sizes_name in constants and constants[sizes_name].ndim == 0:  # one chunk size: pieces from the dim
            width = (dims.get(node.input[0]) or [None] * (abs(axis) + 1))[axis]
            if width is None:
                continue
            chunk = int(constants[sizes_name])
            sizes = [chunk] * (width // chunk) + ([width % chunk] if width % chunk else [])
        elif sizes_name in constants:
            sizes = np.ravel(constants[sizes_name]).tolist()
        elif len(dims.get(sizes_name) or []) == 1 and dims[sizes_name][0] is not None:  # sizes computed at run time
            sizes = [None] * dims[sizes_name][0]
        else:
            continue
        outputs = [f"{node.output[0]}/{i}" for i in range(len(sizes))]
        for user in users:
            outputs[int(np.ravel(constants[user.input[1]])[0])] = user.output[0]  # negative positions count from the end
        if opset >= 18 and None not in sizes and len(set(sizes)) == 1:
            split = helper.make_node("Split", [node.input[0]], outputs, name=node.name, axis=axis, num_outputs=len(sizes))
        else:
            if None not in sizes:  # known sizes as a 1-D initializer (the input may be a chunk size)
                sizes_name = f"{node.output[0]}/sizes"
                graph.initializer.append(numpy_helper.from_array(np.array(sizes, np.int64), sizes_name))
            split = helper.make_node("Split", [node.input[0], sizes_name], outputs, name=node.name, axis=axis)
        position = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(position, split)
        for user in users:
            graph.node.remove(user)
        sequences.add(node.output[0])
        replaced += 1
    if replaced:
        for i in reversed(range(len(graph.value_info))):
            if graph.value_info[i].name in sequences:
                del graph.value_info[i]
        drop_dead(graph)
    return replaced

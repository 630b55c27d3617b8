"""Rewrites applied when ONNX Runtime loads a model, into ONNX Runtime's own fused kernels.

The bundle's ONNX stays standard (TensorRT reads it); ONNX Runtime's CPU provider gets a rewritten
copy. Each rewrite matches exactly and leaves everything else as it is.

**Attention** (`fuse_attention`). PyTorch writes `F.scaled_dot_product_attention` without a mask as

    Qh = Transpose(Reshape(q, [b, -1, H, D]), [0, 2, 1, 3])        (or a Concat on axis 2 of several,
    Kh, Vh likewise                                                  as SD3's joint attention writes it)
    s  = Sqrt(Cast(Div(1, Sqrt(Cast(Slice(Shape(Qh), -1))))))       (sqrt of the default 1/sqrt(D);
                                                                     a constant once the export folds it)
    P  = Softmax(MatMul(Mul(Qh, s), Mul(Transpose(Kh, [0, 1, 3, 2]), s)))
    y  = Reshape(Transpose(MatMul(P, Vh), [0, 2, 1, 3]), [b, -1, H * D])

ONNX Runtime runs that as ~12 kernels with the [b, H, S, S] scores in memory;
`MultiHeadAttention(q, k, v)` on the [b, S, H * D] projections (concatenated along the tokens) is
one kernel with the same default scale (bench-sd3 denoiser: 68.4 -> 59.9 ms a call, outputs within
1e-6). Masked, causal, rotary or explicitly scaled attention is not matched.

**int8 linear layers** (`fuse_int8_matmuls`). A calibrated linear layer is
`Add(MatMul(DQ(Q(x)), DQ(W_int8)), bias)`. ONNX Runtime turns the Q/DQ around the MatMul into
`MatMulIntegerToFloat` itself but leaves the bias Add as a separate pass over the output; written
here as `MatMulIntegerToFloat(Q_uint8(x), W_int8, ..., bias)`, the bias is added inside the GEMM's
output loop (demo int8 denoiser: 1.73 -> 1.61 ms a call, identical outputs). The activation is
quantized to uint8 with the zero point moved by 128, as ONNX Runtime does for its fast u8 x s8 GEMM:
the same integers, so the same result.

On x86 CPUs without VNNI that u8 x s8 GEMM saturates (`runtime/backends/cpu.py`); there the weights
are written as uint8 too (`unsigned_weights=True`: each int8 weight plus 128, zero point 128), which
sends ONNX Runtime to its u8 x u8 kernel: it widens to 16 bits before multiplying, so nothing
saturates and the integer products are exact (bench-sd3's int8 denoiser on an AVX2 EPYC, one thread:
342 ms fp32, 369 ms for the Q/DQ graph run in float, 258 ms u8 x u8; relative L2 to the Q/DQ graph
1.8e-4, against 8.6e-3 for the saturating u8 x s8 kernel).

**AdaLN modulations** (`fuse_modulations`). diffusers' AdaLN layers compute `emb = Linear(SiLU(temb))`
([batch, k * C], a Gemm), chunk it and broadcast each chunk over the tokens:
`x * (1 + scale[:, None]) + shift[:, None]`. Exported, each chunk is a Slice, an Unsqueeze and for
the scales an `Add 1` (a calibrated graph adds SmoothQuant's `Mul 1/s`): kernels of a few hundred
values whose cost is all overhead (the dynamo exporter, used for Flux, writes the chunks as one Split).
Here the Gemm's output is unsqueezed once to [batch, 1, k * C] and split on axis 2 straight into the
broadcast chunks; a constant added to or multiplied into a chunk on the way is folded into that
chunk's columns of the Gemm's weight and bias.

The matching and replacing are written against the protobuf (`graph.view`) rather than with
onnx-graphsurgeon's pattern tools: they run at every session load, where an import / export round
trip would rebuild every weight, and the runtime stays free of onnx-graphsurgeon (the debug extra).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from latentrt.graph.view import GraphView, drop_dead

log = logging.getLogger(__name__)

MAX_INLINE_BYTES = 1 << 31  # larger models keep their weights in external data; they are not rewritten
_STANDARD = ("", "ai.onnx")  # the default ONNX domain, as nodes write it


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _heads(g: GraphView, tensor: str) -> tuple[list[str], int, int | None] | None:
    """`tensor` = Transpose(Reshape(x, [b, -1, H, D]), [0, 2, 1, 3]) or a Concat(axis 2) of those:
    the token-major inputs [x...], H and D (None when D is computed at run time)."""
    concat = g.op(tensor, "Concat")
    parts = list(concat.input) if concat is not None and _attr(concat, "axis") in (2, -2) else [tensor]
    sources, heads, head_dims = [], set(), set()
    for part in parts:
        transpose = g.op(part, "Transpose")
        reshape = g.op(transpose.input[0], "Reshape") if transpose is not None else None
        if reshape is None or list(_attr(transpose, "perm", [])) != [0, 2, 1, 3]:
            return None
        shape = g.op(reshape.input[1], "Concat")
        h = g.constant(shape.input[2]) if shape is not None and len(shape.input) == 4 else None
        if h is None or h.size != 1:
            return None
        d = g.constant(shape.input[3])
        sources.append(reshape.input[0])
        heads.add(int(h.reshape(-1)[0]))
        head_dims.add(int(d.reshape(-1)[0]) if d is not None and d.size == 1 else None)
    return (sources, heads.pop(), head_dims.pop()) if len(heads) == 1 and len(head_dims) == 1 else None


def _is_default_scale(g: GraphView, scale: str, query: str, head_dim: int | None) -> bool:
    """`scale` = Sqrt(Cast?(Div(1, Sqrt(Cast?(Slice(Shape(query), last)))))), PyTorch's sqrt(1/sqrt(D)),
    or that value as a constant (the export folds it where D is static)."""
    constant = g.constant(scale)
    if constant is not None:
        expected = np.sqrt(np.float32(1) / np.sqrt(np.float32(head_dim))) if head_dim else None
        return expected is not None and constant.size == 1 and np.isclose(float(constant.reshape(-1)[0]), expected, rtol=1e-6, atol=0)
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

    g = GraphView(model.graph)
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
        q, k, v = _heads(g, qmul.input[0]), _heads(g, ktrans.input[0]), _heads(g, context.input[1])
        if q is None or k is None or v is None or len({q[1], k[1], v[1]}) != 1 or len(k[0]) != len(v[0]):
            continue
        if not all(_is_default_scale(g, mul.input[1], qmul.input[0], q[2]) for mul in (qmul, kmul)):
            continue
        prefix = softmax.name or softmax.output[0]
        nodes, inputs = [], []
        for which, (sources, _, _) in zip("qkv", (q, k, v)):
            if len(sources) == 1:
                inputs.append(sources[0])
            else:
                nodes.append(helper.make_node("Concat", sources, [f"{prefix}/mha_{which}"], axis=1, name=f"{prefix}/mha_{which}"))
                inputs.append(f"{prefix}/mha_{which}")
        nodes.append(
            helper.make_node("MultiHeadAttention", inputs, list(out_r.output), domain="com.microsoft", num_heads=q[1], name=f"{prefix}/mha")
        )
        replacements[id(out_r)] = nodes
    return _replace(model, replacements)


def fuse_int8_matmuls(model, *, unsigned_weights: bool = False, derived: dict | None = None) -> int:
    """Rewrite each `Add(MatMul(DQ(Q(x)), DQ(W_int8)), bias)` (the Add optional) in `model` into
    ONNX Runtime's `MatMulIntegerToFloat`, with the weights as uint8 when `unsigned_weights` (the
    exact u8 x u8 kernel; `derived` as in `fuse_modulations`); returns how many. See the module docstring."""
    from onnx import helper, numpy_helper

    g = GraphView(model.graph)
    replacements: dict[int, list] = {}
    removed: set[int] = set()
    for matmul in [n for n in model.graph.node if n.op_type == "MatMul"]:
        x_dq, w_dq = g.op(matmul.input[0], "DequantizeLinear"), g.op(matmul.input[1], "DequantizeLinear")
        quant = g.op(x_dq.input[0], "QuantizeLinear") if x_dq is not None else None
        if w_dq is None or quant is None or len(quant.input) < 3 or list(x_dq.input[1:]) != list(quant.input[1:]):
            continue
        if len(g.consumers[quant.output[0]]) != 1 or len(g.consumers[x_dq.output[0]]) != 1:
            continue
        weight, x_scale, x_zero = g.constant(w_dq.input[0]), g.constant(quant.input[1]), g.constant(quant.input[2])
        if weight is None or weight.dtype != np.int8 or weight.ndim != 2 or x_scale is None or x_scale.size != 1:
            continue
        if x_zero is None or x_zero.dtype != np.int8 or _attr(w_dq, "axis", 1) not in (1, -1):
            continue
        add = g.only_consumer(matmul.output[0], "Add")
        bias = None
        if add is not None:
            bias = add.input[1] if add.input[0] == matmul.output[0] else add.input[0]
            value = g.constant(bias)
            if value is None or value.dtype != np.float32 or value.shape != (weight.shape[1],):
                add = bias = None
        prefix = matmul.name or matmul.output[0]
        zero_u8 = numpy_helper.from_array((x_zero.astype(np.int16) + 128).astype(np.uint8), f"{prefix}/x_zero_point_u8")
        model.graph.initializer.append(zero_u8)
        w_zero, w_name = w_dq.input[2] if len(w_dq.input) > 2 else "", w_dq.input[0]
        if unsigned_weights:
            w_scale = g.constant(w_dq.input[1])
            zero = g.constant(w_zero) if w_zero else np.zeros((), np.int8)
            if w_scale is None or zero is None:
                continue
            shifted = numpy_helper.from_array((weight.astype(np.int16) + 128).astype(np.uint8), f"{prefix}/w_u8")
            w_zero_u8 = numpy_helper.from_array(
                np.broadcast_to(zero.astype(np.int16) + 128, w_scale.shape).astype(np.uint8), f"{prefix}/w_zero_point_u8"
            )
            model.graph.initializer.extend([shifted, w_zero_u8])
            if derived is not None:
                derived[shifted.name] = (w_name, _shifted_to_uint8)
            w_name, w_zero = shifted.name, w_zero_u8.name
        inputs = [f"{prefix}/x_u8", w_name, quant.input[1], w_dq.input[1], zero_u8.name, w_zero] + ([bias] if bias else [])
        replacements[id(matmul)] = [
            helper.make_node("QuantizeLinear", [quant.input[0], quant.input[1], zero_u8.name], [f"{prefix}/x_u8"], name=f"{prefix}/quantize_u8"),
            helper.make_node(
                "MatMulIntegerToFloat", inputs, [add.output[0] if add is not None else matmul.output[0]], domain="com.microsoft", name=f"{prefix}/int8"
            ),
        ]
        removed.update({id(quant), id(x_dq)} | ({id(add)} if add is not None else set()))
    return _replace(model, replacements, removed)


def _shifted_to_uint8(weight: np.ndarray) -> np.ndarray:
    return (weight.astype(np.int16) + 128).astype(np.uint8)


def _scaled_columns(weight: np.ndarray, *, scale: np.ndarray, rows: bool) -> np.ndarray:
    return weight.astype(np.float32) * (scale[:, None] if rows else scale[None, :])


def fuse_modulations(model, derived: dict | None = None) -> int:
    """Rewrite each Gemm whose output is only chunked and broadcast (see the module docstring) in
    `model` (in place); returns how many. `derived`, if given, receives for each weight made here
    from another: {new initializer: (source initializer, function)} with `new = function(source)`
    (here the source scaled along its output columns), so a later change of the source (LoRA) can
    be carried over."""
    from onnx import helper, numpy_helper

    g = GraphView(model.graph)
    outputs = {o.name for o in model.graph.output}
    replacements: dict[int, list] = {}
    removed: set[int] = set()
    for gemm in [n for n in model.graph.node if n.op_type == "Gemm" and n.domain in _STANDARD]:
        if _attr(gemm, "transA", 0) or _attr(gemm, "alpha", 1.0) != 1.0 or _attr(gemm, "beta", 1.0) != 1.0:
            continue
        weight = g.constant(gemm.input[1])
        if weight is None or weight.ndim != 2 or weight.dtype.kind != "f":
            continue
        rows = bool(_attr(gemm, "transB", 0))  # the weight is [N, K]: output columns are its rows
        width = weight.shape[0 if rows else 1]
        has_bias = len(gemm.input) > 2 and bool(gemm.input[2])
        bias = g.constant(gemm.input[2]) if has_bias else np.zeros(width, weight.dtype)
        chunks = _chunks(g, gemm.output[0], 0, width, outputs)
        if bias is None or bias.shape not in ((width,), (1, width)) or chunks is None or not _tiles(chunks, width):
            continue
        ends = [_broadcast(g, name, hi - lo, weight.dtype, outputs) for lo, hi, name in chunks]
        if any(e is None for e in ends):
            continue
        column_scale = np.concatenate([scale for _, scale, _ in ends])
        scaled = bool(np.any(column_scale != 1))
        with np.errstate(over="ignore", invalid="ignore"):
            if scaled:
                weight = weight * (column_scale[:, None] if rows else column_scale)
            bias = bias.reshape(width) * column_scale + np.concatenate([shift for _, _, shift in ends])
        if not np.all(np.isfinite(bias)) or (scaled and not np.all(np.isfinite(weight))):  # float16 can overflow
            continue
        prefix = gemm.output[0]
        tensors = [
            numpy_helper.from_array(bias, f"{prefix}/modulation_bias"),
            numpy_helper.from_array(np.array([1], np.int64), f"{prefix}/axis_1"),
            numpy_helper.from_array(np.array([hi - lo for lo, hi, _ in chunks], np.int64), f"{prefix}/chunk_widths"),
        ]
        if scaled:
            tensors.append(numpy_helper.from_array(weight, f"{prefix}/modulation_weight"))
            if derived is not None:
                derived[tensors[-1].name] = (gemm.input[1], functools.partial(_scaled_columns, scale=column_scale, rows=rows))
        model.graph.initializer.extend(tensors)
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        w_name = tensors[-1].name if scaled else gemm.input[1]
        replacements[id(gemm)] = [
            helper.make_node("Gemm", [gemm.input[0], w_name, tensors[0].name], [f"{prefix}/modulation"], name=gemm.name, **attrs),
            helper.make_node("Unsqueeze", [f"{prefix}/modulation", tensors[1].name], [f"{prefix}/modulation_3d"], name=f"{prefix}/unsqueeze"),
            helper.make_node("Split", [f"{prefix}/modulation_3d", tensors[2].name], [name for name, _, _ in ends], axis=2, name=f"{prefix}/chunks"),
        ]
        removed.update(id(g.producer[name]) for name, _, _ in ends)
    return _replace(model, replacements, removed)


def _chunks(g: GraphView, name: str, lo: int, hi: int, outputs: set) -> list | None:
    """The tensors that Slices and Splits on axis 1 cut from `name` (columns lo:hi of a 2-D tensor),
    as sorted (lo, hi, tensor); None if anything else reads `name`."""
    readers = g.consumers.get(name, [])
    if name in outputs or not readers:
        return None
    chunks = []
    for node in readers:
        inputs = list(node.input) + [""] * 5
        if node.domain not in _STANDARD:
            return None
        if node.op_type == "Slice":
            starts, ends = g.constant(inputs[1]), g.constant(inputs[2])
            axes = g.constant(inputs[3]) if inputs[3] else np.zeros(1, np.int64)
            steps = g.constant(inputs[4]) if inputs[4] else np.ones(1, np.int64)
            if any(v is None or v.size != 1 for v in (starts, ends, axes, steps)) or int(axes.item()) not in (1, -1) or steps.item() != 1:
                return None
            start, end = (int(np.clip(v + (hi - lo) if v < 0 else v, 0, hi - lo)) for v in (starts.item(), ends.item()))
            parts = [(lo + start, lo + end, node.output[0])]
        elif node.op_type == "Split":
            sizes = g.constant(inputs[1]) if inputs[1] else None
            count = _attr(node, "num_outputs")
            if sizes is None and count:  # opset 18: equal parts, the last one smaller if need be
                part = -(-(hi - lo) // count)
                sizes = np.array([part] * (count - 1) + [hi - lo - part * (count - 1)])
            if _attr(node, "axis", 0) not in (1, -1) or sizes is None or sizes.sum() != hi - lo:
                return None
            edges = lo + np.concatenate([[0], np.cumsum(sizes)])
            parts = [(int(a), int(b), out) for a, b, out in zip(edges[:-1], edges[1:], node.output)]
        else:
            return None
        for a, b, out in parts:
            inner = g.consumers.get(out, [])
            if inner and all(n.op_type in ("Slice", "Split") for n in inner):
                more = _chunks(g, out, a, b, outputs)
                if more is None:
                    return None
                chunks += more
            else:
                chunks.append((a, b, out))
    return sorted(chunks)


def _tiles(chunks: list, width: int) -> bool:
    """The chunks cover columns 0:width exactly once, in order."""
    edge = 0
    for lo, hi, _ in chunks:
        if lo != edge or hi <= lo:
            return False
        edge = hi
    return edge == width


def _broadcast(g: GraphView, name: str, width: int, dtype, outputs: set) -> tuple | None:
    """Follow a [batch, width] chunk through one `Unsqueeze(axes=[1])` and any Adds and Muls of
    constants (scalars or [width] vectors) on the way: (the broadcast chunk's name, scale, shift)
    with `broadcast = chunk * scale + shift`, or None if the chunk is not unsqueezed on axis 1."""
    scale, shift = np.ones(width, dtype), np.zeros(width, dtype)
    unsqueezed = False
    while name not in outputs and len(g.consumers.get(name, [])) == 1:
        node = g.consumers[name][0]
        if node.domain not in _STANDARD:
            break
        if node.op_type == "Unsqueeze" and not unsqueezed:
            axes = g.constant(node.input[1]) if len(node.input) > 1 else None
            if axes is None or axes.reshape(-1).tolist() != [1]:
                return None
            unsqueezed = True
        elif node.op_type in ("Add", "Mul"):
            other = node.input[1] if node.input[0] == name else node.input[0]
            value = _per_column(g.constant(other), width, 3 if unsqueezed else 2, dtype)
            if value is None:
                break
            if node.op_type == "Add":
                shift = shift + value
            else:
                scale, shift = scale * value, shift * value
        else:
            break
        name = node.output[0]
    return (name, scale, shift) if unsqueezed else None


def _per_column(value, width: int, rank: int, dtype) -> np.ndarray | None:
    """A constant as [width] per-column values, if it broadcasts onto a rank-`rank` [..., width]
    tensor without changing its shape; else None."""
    if value is None or value.dtype != dtype or value.ndim > rank or any(d != 1 for d in value.shape[:-1]):
        return None
    if value.ndim and value.shape[-1] not in (1, width):
        return None
    return np.broadcast_to(value.reshape(-1), (width,))


def _replace(model, replacements: dict[int, list], removed: set[int] = frozenset()) -> int:
    """Put each `replacements[id(node)]` in that node's place, drop `removed` and dead nodes."""
    from onnx import helper

    if not replacements:
        return 0
    order = []
    for node in model.graph.node:
        if id(node) not in removed:
            order.extend(replacements.get(id(node), [node]))
    del model.graph.node[:]
    model.graph.node.extend(order)
    drop_dead(model.graph)
    contrib = any(n.domain == "com.microsoft" for nodes in replacements.values() for n in nodes)
    if contrib and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replacements)


def rewritten_for_onnx_runtime(
    path: str | os.PathLike, scratch: str | os.PathLike, *, int8_kernels: bool = True, unsigned_weights: bool = False
) -> Path | None:
    """A copy of the model at `path` with the rewrites above applied, written into `scratch`; None
    when nothing matched or the model keeps its weights in external data. `int8_kernels=False`
    leaves int8 linears as Q/DQ; `unsigned_weights=True` gives them the u8 x u8 kernel (for CPUs
    whose u8 x s8 GEMM saturates)."""
    import onnx

    path = Path(path)
    if path.stat().st_size > MAX_INLINE_BYTES or (path.parent / (path.name + ".data")).exists():
        return None
    model = onnx.load(str(path))
    if not rewrite_model(model, int8_kernels=int8_kernels, unsigned_weights=unsigned_weights):
        return None
    fd, name = tempfile.mkstemp(suffix=".onnx", dir=scratch)
    os.close(fd)  # only the name is needed: an fd left open here outlived the deleted file, one per load
    out = Path(name)
    # Tensor by tensor into a data file: no second in-memory copy of the weights while writing.
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=out.name + ".data")
    return out


def rewrite_model(model, *, int8_kernels: bool = True, unsigned_weights: bool = False, derived: dict | None = None) -> bool:
    """Apply the rewrites above to `model` in place; True if any matched. `derived`: see
    `fuse_modulations`."""
    attention = fuse_attention(model)
    int8 = fuse_int8_matmuls(model, unsigned_weights=unsigned_weights, derived=derived) if int8_kernels else 0
    modulations = fuse_modulations(model, derived)
    log.debug(
        "%s: %d attention blocks as MultiHeadAttention, %d int8 linears as MatMulIntegerToFloat, %d modulations unsqueezed once",
        model.graph.name, attention, int8, modulations,
    )
    return bool(attention or int8 or modulations)

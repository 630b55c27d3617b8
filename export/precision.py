"""Half precision (fp16 / bf16) that does not produce black images: a graph pass with fp32 islands.

Converting every float tensor of a diffusion pipeline to fp16 overflows (T5's FFN activations pass
65504, the largest fp16 value) and the image comes out black (NaN). The pass here converts an fp32
ONNX model to fp16 or bf16 and keeps in fp32 the nodes that need it:

1. `record_ranges` runs the fp32 model on ONNX Runtime (CPU) over a few real inputs with every
   intermediate float tensor exposed as an output, and keeps each tensor's max |value|.
2. `convert_precision` rewrites the graph. A node stays fp32 ("an island") when
     - "overflow": a float input or output's recorded range exceeds `margin * max(half)`;
     - "normalisation": it is LayerNormalization / GroupNormalization / InstanceNormalization /
       RMSNormalization, or the decomposed form exporters write (T5's RMS norm is
       `Pow(x, 2) -> ReduceMean -> Add(eps) -> Sqrt -> Div(1, .) -> Mul(x, .)`; the
       mean-subtracted LayerNorm adds `ReduceMean -> Sub`): the whole chain stays fp32, since
       x ** 2 overflows fp16 as soon as |x| > 256;
     - "softmax": Softmax (its exp and sum run in fp32), and the computation of logits that exceed
       `softmax_input_limit` (fp16 cannot hold large logits precisely enough for exp);
     - "index": float arithmetic that ends in a cast to an integer (T5's relative-position buckets,
       shape arithmetic) is kept with its float ancestors, so rounding cannot move a bucket;
     - "embedding": Sin / Cos and the float arithmetic feeding them (the sinusoidal timestep
       embedding takes `t * freq` with t up to 1000: in fp16 its spacing is 0.5 rad);
     - "unsupported": ops whose ONNX schema at the model's opset has no half type for their float
       slots (for bf16 at opset 18: Conv, InstanceNormalization, Einsum, Sin, Cos, ConstantOfShape;
       pass `opset=22` to convert to opset 22 first, where all but Einsum take bfloat16), ops with
       a fixed output dtype, subgraphs and custom domains.
   Every other float32 tensor, initializer, Cast target and Constant becomes fp16 / bf16; Casts are
   inserted where an island meets the half graph. Inputs the spec fixes to float32 (Resize's
   scales) stay float32. Graph inputs and outputs stay float32 (Casts at the boundary), so the
   runtime and the manifest see the same I/O as the fp32 bundle.

What ONNX Runtime 1.32's CPUExecutionProvider does with the converted graphs (measured on the
tiny-sd3 components, session optimizations off and on):
  - fp16: the session loads and runs, but only data movement runs in float16 (Identity, Reshape,
    Shape, Transpose, Gather, Unsqueeze). For every compute op (MatMul, Gemm, Conv, Add, Mul, Div,
    Sqrt, Pow, Erf, Tanh, Sigmoid, Softmax, Resize, Where, ...) ORT's InsertCastTransformer wraps the
    node in Casts to float32, and chains of such nodes pass float32 between them: a native CPU run
    skips most of the fp16 rounding and under-reports the error (tiny-sd3 VAE: 2.0e-3 native vs
    2.6e-3 with every tensor rounded).
  - bf16: no bfloat16 kernels for Add, Mul, Div, MatMul, Gemm, Sqrt, Pow, Erf, Tanh, Sigmoid, Where,
    Equal, Expand, Trilu, Resize, ...: the session fails to load (NOT_IMPLEMENTED). Cast
    float32 <-> bfloat16 does run.
  The converted graphs are meant for TensorRT / CUDA, which have the kernels.

How a converted model is validated on CPU, for both dtypes (`simulation_model`): the converted
graph is turned back into a float32 graph in which every tensor that is half in the converted model
is rounded through its half dtype: half initializers become the (exact) float32 of their half
values, each node that computes in half computes in float32 and its outputs pass through
`Cast(to=half) -> Cast(to=float)`, and Casts to half become that round trip. ONNX Runtime CPU runs
those Casts natively (float16 and bfloat16), so the rounding of every stored tensor is real; what
is simulated is the arithmetic inside each op (float32 accumulation, as TensorRT and cuBLAS do for
fp16 / bf16 GEMMs and convolutions). fp32 islands run in float32 exactly as in the converted model.

Example:
    ranges = record_ranges("onnx/text_encoder_3.onnx", [{"input_ids": ids}])
    report = convert_precision("onnx/text_encoder_3.onnx", "fp16/text_encoder_3.onnx", "fp16", ranges)
    simulation_model("fp16/text_encoder_3.onnx", "check/text_encoder_3.onnx")  # runs on ORT CPU
    # then validate_component(comp, Path("check/text_encoder_3.onnx"), tolerance=1e-2)
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from latentrt.errors import ExportError, InputError

logger = logging.getLogger(__name__)

Precision = Literal["fp16", "bf16"]

FLOAT, FLOAT16, BFLOAT16 = 1, 10, 16  # onnx.TensorProto data types
_HALF_TYPE = {"fp16": FLOAT16, "bf16": BFLOAT16}
_HALF_MAX = {"fp16": 65504.0, "bf16": 3.3895313892515355e38}

NORMALISATION_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "RMSNormalization")
DEFAULT_KEEP_FP32_OPS = NORMALISATION_OPS + ("Softmax", "Sin", "Cos")

# Ops whose output dtype does not follow their float inputs, or that we cannot see into.
_UNSUPPORTED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike", "Multinomial",
                "Bernoulli", "If", "Loop", "Scan", "SequenceConstruct", "SplitToSequence"}
_REASONS = {**dict.fromkeys(NORMALISATION_OPS, "normalisation"), "Softmax": "softmax", "Sin": "embedding", "Cos": "embedding"}
# Backward walks (index arithmetic, embeddings) stop at these: they carry the heavy compute.
_HEAVY = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "Attention", "MultiHeadAttention"}
# Ops that take any input dtype: no Cast in front of them.
_ANY_INPUT_TYPE = {"Cast", "Shape", "Size"}
# A converted model above this many bytes of weights is written with external data (protobuf's 2 GiB limit).
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


@dataclass(frozen=True)
class PrecisionReport:
    """What `convert_precision` did; `to_dict()` goes into the manifest.

    Attributes:
        precision: "fp16" or "bf16".
        margin: the fraction of the half dtype's largest value a recorded range may reach.
        kept_fp32: node name -> why it stays float32 ("overflow", "normalisation", "softmax",
            "index", "embedding", "unsupported", "requested").
        half_nodes: nodes that compute in half precision.
        casts_inserted: Cast nodes added at island and graph boundaries.
        half_initializers / fp32_initializers: initializers stored in half / left in float32.
        external_data: the external data file written next to the model, if any.
    """

    precision: str
    margin: float
    kept_fp32: dict[str, str]
    half_nodes: int
    casts_inserted: int
    half_initializers: int
    fp32_initializers: int
    external_data: tuple[str, ...] = ()
    reasons: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        counts: dict[str, int] = defaultdict(int)
        for reason in self.kept_fp32.values():
            counts[reason] += 1
        object.__setattr__(self, "reasons", dict(sorted(counts.items())))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["external_data"] = list(self.external_data)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrecisionReport:
        fields = {k: v for k, v in d.items() if k != "reasons"}
        return cls(**{**fields, "external_data": tuple(d.get("external_data", ()))})


# ----------------------------------------------------------------------------------------------
# Ranges


def record_ranges(
    model_path: str | os.PathLike,
    feeds: list[dict[str, np.ndarray]],
    *,
    tensors_per_run: int | None = None,
) -> dict[str, float]:
    """Max |value| of every float32 tensor of an fp32 ONNX model over `feeds`, run on ONNX Runtime CPU.

    Args:
        model_path: the fp32 model (external data is read from its folder).
        feeds: input dicts ({input name: array}) of real inputs (a few prompts, timesteps, sizes).
        tensors_per_run: expose at most this many intermediate tensors per session run (the model is
            re-run for the rest): bounds memory for large activations. None exposes all at once.

    Returns:
        {tensor name: max |x| over the finite values} for graph inputs and node outputs. Tensors that
        held NaN map to nan (the fp32 model itself is broken there); +-inf alone is not recorded as a
        range, since the half dtypes hold it too (attention masks use -inf).

    Memory: one feed runs at a time and each tensor is reduced to a float as soon as it comes back.
    The graph is copied (without its weights) to a temporary file next to `model_path`, so external
    data resolves; the copy is removed afterwards.
    """
    import onnx
    import onnxruntime as ort

    model_path = Path(model_path)
    if not feeds:
        raise InputError("record_ranges needs at least one feed ({input name: array}); got an empty list")
    model = onnx.load(str(model_path), load_external_data=False)
    types = _tensor_types(model)
    outputs = {o.name for o in model.graph.output}
    names = [t for node in model.graph.node for t in node.output if t and types.get(t) == FLOAT and t not in outputs]
    names += [o.name for o in model.graph.output if types.get(o.name) == FLOAT]
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, FLOAT, None) for t in names)

    ranges: dict[str, float] = {}

    def update(name: str, value: np.ndarray) -> None:
        value = np.asarray(value)
        if value.dtype.kind != "f" or value.size == 0:
            return
        finite = np.isfinite(value)
        if np.isnan(value).any():
            ranges[name] = math.nan
            return
        peak = float(np.abs(value[finite]).max()) if finite.any() else 0.0
        previous = ranges.get(name, 0.0)
        ranges[name] = previous if math.isnan(previous) else max(previous, peak)

    chunk = tensors_per_run or max(len(names), 1)
    scratch = model_path.parent / f".{model_path.stem}.ranges-{uuid.uuid4().hex[:8]}.onnx"
    try:
        onnx.save_model(model, str(scratch))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(scratch), options, providers=["CPUExecutionProvider"])
        for i, feed in enumerate(feeds):
            for name, value in feed.items():
                update(name, value)
            for start in range(0, len(names), chunk):
                part = names[start : start + chunk]
                try:
                    values = session.run(part, feed)
                except Exception as err:  # ORT raises its own types; name the model and the feed
                    shapes = {k: tuple(np.shape(v)) for k, v in feed.items()}
                    raise InputError(
                        f"{model_path.name}: ONNX Runtime could not run feed {i} with shapes {shapes}: {err}. "
                        "Pass real inputs with the model's input names, dtypes and in-range token ids"
                    ) from err
                for name, value in zip(part, values):
                    update(name, value)
    finally:
        scratch.unlink(missing_ok=True)
    return ranges


# ----------------------------------------------------------------------------------------------
# Conversion


def convert_precision(
    model_path: str | os.PathLike,
    out_path: str | os.PathLike,
    precision: Precision,
    ranges: dict[str, float] | None,
    *,
    margin: float = 0.5,
    keep_fp32_ops: tuple[str, ...] = DEFAULT_KEEP_FP32_OPS,
    softmax_input_limit: float = 16.0,
    opset: int | None = None,
) -> PrecisionReport:
    """Write `out_path`: the fp32 model at `model_path` in fp16 or bf16, with fp32 islands.

    Args:
        model_path: an fp32 ONNX model (bf16 needs opset >= 13; external data is read from its folder).
        out_path: where to write the converted model (external data `<name>.data` next to it when
            the weights still exceed ~1.9 GB). Must differ from `model_path`.
        precision: "fp16" or "bf16".
        ranges: `record_ranges` output. None disables the overflow islands (and the softmax producer
            rule); with `keep_fp32_ops=()` as well, the conversion is the naive all-half one.
        margin: a node stays fp32 when a float input or output's range exceeds
            `margin * max(half dtype)` (fp16: 0.5 * 65504 = 32752 by default).
        keep_fp32_ops: op types kept fp32. "RMSNormalization" / "LayerNormalization" also keep their
            decomposed forms; "Sin" / "Cos" keep their float arguments too. The "index" rule (float
            arithmetic cast to an integer) and "unsupported" ops apply always.
        softmax_input_limit: with ranges, a kept Softmax whose logits exceed this also keeps the
            logits' computation fp32, back to and including its MatMul (fp16 spacing at 16 is
            2**-6, which moves exp(x) by up to 0.8%; T5's unscaled logits reach ~80 with XXL widths,
            where the spacing is 2**-4 and its fp16 output drifted 1.5e-2 from fp32).
        opset: convert the graph to this opset first (`onnx.version_converter`). The ONNX spec
            admits bfloat16 for Conv, InstanceNormalization, Einsum, Sin, Cos, ConstantOfShape only
            from opset 22 (float16 is fine at 18): below it those nodes stay fp32 ("unsupported").
            So pass `opset=22` with "bf16" unless the model was exported at 22.

    Returns:
        A `PrecisionReport`. Graph inputs and outputs stay float32.

    Example:
        >>> report = convert_precision("vae.onnx", "vae.fp16.onnx", "fp16", ranges)
        >>> report.kept_fp32  # {'/decoder/.../InstanceNormalization': 'normalisation', ...}
    """
    import onnx

    model_path, out_path = Path(model_path), Path(out_path)
    if model_path.resolve() == out_path.resolve():
        raise InputError(f"convert_precision writes a new model: out_path {out_path} must differ from model_path")
    model = onnx.load(str(model_path), load_external_data=False)
    model, report = convert_model(
        model, precision, ranges, margin=margin, keep_fp32_ops=keep_fp32_ops, softmax_input_limit=softmax_input_limit,
        opset=opset, weights=lambda m: _load_weights(m, model_path.parent), what=model_path.name,
    )
    report = replace(report, external_data=_save(model, out_path))
    logger.info("%s -> %s: %d nodes in %s, %d kept fp32 %s", model_path.name, out_path.name, report.half_nodes,
                precision, len(report.kept_fp32), report.reasons)
    return report


def convert_model(
    model,
    precision: Precision,
    ranges: dict[str, float] | None,
    *,
    margin: float = 0.5,
    keep_fp32_ops: tuple[str, ...] = DEFAULT_KEEP_FP32_OPS,
    softmax_input_limit: float = 16.0,
    opset: int | None = None,
    deferred: frozenset[str] | set[str] = frozenset(),
    weights=None,
    what: str = "model",
):
    """`convert_precision` on a ModelProto: returns the converted model (possibly a new object) and its report.

    Initializers in `deferred` hold no data (their values are written later, from the checkpoint):
    their dtype is set and the writer converts them; their ranges must be in `ranges`.
    `weights(model)`, if given, loads the other initializers' data after the types are read.
    """
    import onnx

    if precision not in _HALF_TYPE:
        raise InputError(f"precision must be 'fp16' or 'bf16', got {precision!r}")
    if not 0 < margin <= 1:
        raise InputError(f"margin must be in (0, 1], got {margin}")
    if opset is not None:
        declared = {v.name for v in model.graph.value_info}
        try:
            model = onnx.version_converter.convert_version(model, opset)
        except Exception as err:  # the converter raises RuntimeError / ConvertError without the file name
            raise ExportError(f"{what}: cannot convert to opset {opset}: {err}; re-export at that opset") from err
        kept = [v for v in model.graph.value_info if v.name in declared]  # drop the converter's inferred shapes
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
    opset = _opset(model)
    if precision == "bf16" and opset < 13:
        raise InputError(f"{what}: opset {opset} has no bfloat16 Cast; re-export with opset >= 13 (latentrt uses 18)")
    graph = model.graph
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    if len({n.name for n in graph.node}) != len(graph.node):
        raise ExportError(f"{what}: node names are not unique; the precision report is keyed by node name")

    half = _HALF_TYPE[precision]
    types = _tensor_types(model)
    if weights is not None:
        weights(model)
    if ranges is not None:  # inline initializers and Constants are measured here, not by record_ranges
        ranges = {**_constant_ranges(model, skip=deferred), **ranges}
    limit = margin * _HALF_MAX[precision]

    keep = _islands(graph, types, ranges, limit, keep_fp32_ops, softmax_input_limit, _HalfSlots(opset, half, types))
    stats = _rewrite(model, types, keep, half, _HalfSlots(opset, half, types), deferred)
    report = PrecisionReport(
        precision=precision,
        margin=margin,
        kept_fp32=keep,
        half_nodes=stats["half_nodes"],
        casts_inserted=stats["casts"],
        half_initializers=stats["half_initializers"],
        fp32_initializers=stats["fp32_initializers"],
    )
    return model, report


def _tensor_types(model) -> dict[str, int]:
    """elem_type of every tensor: graph I/O, initializers, Constants and ONNX shape inference."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)  # the model holds no weights here: small
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
                elif a.name in ("value_float", "value_floats"):
                    types[node.output[0]] = FLOAT
    return {k: v for k, v in types.items() if v}


def _load_weights(model, base_dir: Path) -> None:
    """Read external data into the initializers one tensor at a time (they are halved before saving)."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(base_dir))
            del tensor.external_data[:]
            tensor.data_location = 0  # TensorProto.DEFAULT


def _constant_ranges(model, skip=frozenset()) -> dict[str, float]:
    from onnx import numpy_helper

    out = {}
    values = [(t.name, t) for t in model.graph.initializer if t.data_type == FLOAT and t.name not in skip]
    values += [(n.output[0], a.t) for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
               if a.name == "value" and a.t.data_type == FLOAT]
    for name, tensor in values:
        array = numpy_helper.to_array(tensor)
        finite = array[np.isfinite(array)]
        out[name] = float(np.abs(finite).max()) if finite.size else 0.0
    return out


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


class _HalfSlots:
    """What the ONNX spec allows at `opset`: can a node's float slots take the half dtype, and which
    inputs does it fix to float32 (Resize's `scales`)."""

    def __init__(self, opset: int, half: int, types: dict[str, int]) -> None:
        self.opset, self.types = opset, types
        self.half_str = "tensor(float16)" if half == FLOAT16 else "tensor(bfloat16)"

    def _formal(self, node):
        import onnx.defs

        try:
            schema = onnx.defs.get_schema(node.op_type, self.opset, node.domain)
        except onnx.defs.SchemaError:
            return None
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
        return schema, allowed

    def allowed(self, node) -> bool:
        found = self._formal(node)
        if found is None:
            return False
        schema, allowed = found
        for actual, formal in ((node.input, schema.inputs), (node.output, schema.outputs)):
            for i, t in enumerate(actual):
                if self.types.get(t) != FLOAT or not formal:
                    continue
                type_str = formal[min(i, len(formal) - 1)].type_str  # the last formal parameter may be variadic
                if type_str in allowed and self.half_str not in allowed[type_str]:
                    return False
                if type_str not in allowed and actual is node.output:
                    return False  # an output fixed to float32
        return True

    def fp32_inputs(self, node) -> set[int]:
        found = self._formal(node)
        if found is None:
            return set()
        formal = found[0].inputs
        return {i for i in range(len(node.input)) if formal and formal[min(i, len(formal) - 1)].type_str == "tensor(float)"}


def _islands(graph, types, ranges, limit, keep_ops, softmax_input_limit, slots: _HalfSlots) -> dict[str, str]:
    """node name -> reason, for every node that stays float32."""
    producer = {t: n for n in graph.node for t in n.output}
    consumers: dict[str, list] = defaultdict(list)
    for n in graph.node:
        for t in n.input:
            consumers[t].append(n)

    def is_float(t: str) -> bool:
        return types.get(t) == FLOAT

    def float_node(n) -> bool:
        return any(is_float(t) for t in list(n.input) + list(n.output))

    keep: dict[str, str] = {}

    def mark(n, reason: str) -> None:
        keep.setdefault(n.name, reason)

    def ancestors(n, reason: str) -> None:
        """Mark n and the float arithmetic feeding it, stopping at heavy ops and graph inputs."""
        stack = [n]
        while stack:
            node = stack.pop()
            if node.name in keep and node is not n:
                continue
            mark(node, reason)
            for t in node.input:
                p = producer.get(t)
                if p is not None and is_float(t) and p.op_type not in _HEAVY and p.op_type not in NORMALISATION_OPS:
                    stack.append(p)

    for n in graph.node:
        if any(t and t not in types for t in n.output):  # shape inference could not type it: leave it fp32
            mark(n, "unsupported")
        elif not float_node(n):
            continue
        elif n.op_type in _UNSUPPORTED or n.domain not in ("", "ai.onnx") or not slots.allowed(n):
            mark(n, "unsupported")
        elif n.op_type in keep_ops:
            mark(n, _REASONS.get(n.op_type, "requested"))

    # Subgraphs (If/Loop/Scan) stay fp32, and so do the outer tensors they read by name: their
    # producers are kept fp32 so the subgraph's types still hold.
    for n in graph.node:
        for attr in n.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                for inner in sub.node:
                    for t in inner.input:
                        if t in producer and is_float(t):
                            mark(producer[t], "subgraph")

    # Decomposed normalisations: ReduceMean(Pow(x, 2) or Mul(x, x)) ... Mul/Div(x, .)
    for n in graph.node:
        if n.op_type != "ReduceMean" or not is_float(n.output[0]):
            continue
        square = producer.get(n.input[0])
        if square is None or not _is_square(square, producer):
            continue
        x = square.input[0]
        centred = producer.get(x)
        kind = "LayerNormalization" if centred is not None and centred.op_type == "Sub" else "RMSNormalization"
        if kind not in keep_ops:
            continue
        chain = [square, n]
        if kind == "LayerNormalization":
            mean = producer.get(centred.input[1])
            chain += [centred] + ([mean] if mean is not None and mean.op_type == "ReduceMean" else [])
        node = n
        for _ in range(6):  # Add(eps) -> Sqrt -> Div/Reciprocal -> Mul(x, .)
            nexts = [c for c in consumers[node.output[0]] if c.op_type in ("Add", "Sqrt", "Div", "Reciprocal", "Mul", "Cast")]
            if len(nexts) != 1:
                break
            node = nexts[0]
            chain.append(node)
            if node.op_type in ("Mul", "Div") and x in node.input:
                break
        for c in chain:
            mark(c, "normalisation")

    # Float arithmetic that becomes an integer, and the arguments of sinusoidal embeddings.
    for n in graph.node:
        if n.op_type == "Cast" and n.input and is_float(n.input[0]) and not is_float(n.output[0]):
            if types.get(n.output[0]) not in (FLOAT16, BFLOAT16, 11):
                ancestors(n, "index")
        elif n.op_type in ("Sin", "Cos") and n.op_type in keep_ops:
            ancestors(n, "embedding")

    if ranges is not None:
        for n in graph.node:
            if n.name in keep or not float_node(n):
                continue
            peaks = [ranges.get(t, 0.0) for t in list(n.input) + list(n.output) if is_float(t)]
            if any(p > limit for p in peaks if not math.isnan(p)):
                mark(n, "overflow")
        for n in graph.node:
            if n.op_type == "Softmax" and n.name in keep and ranges.get(n.input[0], 0.0) > softmax_input_limit:
                # The logits' whole computation: the elementwise ops (scale, bias, mask) and the MatMul.
                stack = [producer.get(n.input[0])]
                while stack:
                    p = stack.pop()
                    if p is None or p.name in keep or not float_node(p):
                        continue
                    mark(p, "softmax")
                    if p.op_type not in _HEAVY:
                        stack += [producer.get(t) for t in p.input if is_float(t)]
    return keep


def _is_square(node, producer) -> bool:
    if node.op_type == "Mul":
        return len(node.input) == 2 and node.input[0] == node.input[1]
    if node.op_type != "Pow":
        return False
    exponent = producer.get(node.input[1])
    if exponent is None or exponent.op_type != "Constant":
        return False
    from onnx import numpy_helper

    value = next((numpy_helper.to_array(a.t) for a in exponent.attribute if a.name == "value"), None)
    return value is not None and value.size == 1 and float(value.reshape(())) == 2.0


def _rewrite(model, types, keep: dict[str, str], half: int, slots: _HalfSlots, deferred=frozenset()) -> dict[str, int]:
    """Retype the graph in place: half everywhere a node is not kept fp32, Casts where dtypes meet."""
    import onnx

    graph = model.graph
    is_float = lambda t: types.get(t) == FLOAT  # noqa: E731
    consumers: dict[str, list] = defaultdict(list)
    for n in graph.node:
        for i, t in enumerate(n.input):
            consumers[t].append((n, i))

    fp32_inputs = {n.name: slots.fp32_inputs(n) for n in graph.node}

    def wants_half(n, slot: int) -> bool:
        return n.name not in keep and slot not in fp32_inputs[n.name]

    def computes_half(n) -> bool:
        if n.name in keep:
            return False
        if n.op_type == "Constant":  # a constant follows its consumers
            return is_float(n.output[0]) and all(wants_half(c, i) for c, i in consumers[n.output[0]]) and bool(consumers[n.output[0]])
        return any(is_float(t) for t in list(n.input) + list(n.output))

    # 1. New dtype of every float tensor.
    dtype: dict[str, int] = {v.name: FLOAT for v in graph.input if is_float(v.name)}
    initializers = {t.name: t for t in graph.initializer}
    stats = {"half_nodes": 0, "casts": 0, "half_initializers": 0, "fp32_initializers": 0}
    for name, tensor in initializers.items():
        if tensor.data_type != FLOAT:
            continue
        users = consumers[name]
        if users and all(wants_half(c, i) for c, i in users):
            if name in deferred:
                tensor.data_type = half  # no data yet: the writer converts it
            else:
                _to_half(tensor, half)
            dtype[name] = half
            stats["half_initializers"] += 1
        else:
            dtype[name] = FLOAT
            stats["fp32_initializers"] += 1
    half_nodes = {n.name for n in graph.node if computes_half(n)}
    for n in graph.node:
        for t in n.output:
            if is_float(t):
                dtype[t] = half if n.name in half_nodes else FLOAT

    # 2. Graph outputs stay float32: a half producer writes `<name>/half`, a Cast restores the name.
    tail = []
    for out in graph.output:
        if dtype.get(out.name) != half:
            continue
        renamed = out.name + "/half"
        for n in graph.node:
            n.output[:] = [renamed if t == out.name else t for t in n.output]
            n.input[:] = [renamed if t == out.name else t for t in n.input]
        dtype[renamed] = half
        tail.append(onnx.helper.make_node("Cast", [renamed], [out.name], name=out.name + "/to_fp32", to=FLOAT))

    # 3. Retype nodes and insert Casts in front of consumers whose dtype differs.
    casts: dict[tuple[str, int], str] = {}
    nodes = []
    for n in graph.node:
        in_half = n.name in half_nodes
        if in_half:
            stats["half_nodes"] += 1
            _retype_attributes(n, half)
        for i, t in enumerate(n.input):
            if not t or dtype.get(t) not in (FLOAT, half) or n.op_type in _ANY_INPUT_TYPE:
                continue
            want = half if in_half and wants_half(n, i) else FLOAT
            if dtype[t] == want:
                continue
            key = (t, want)
            if key not in casts:
                casts[key] = f"{t}/to_{'fp32' if want == FLOAT else 'half'}"
                nodes.append(onnx.helper.make_node("Cast", [t], [casts[key]], name=casts[key], to=want))
                stats["casts"] += 1
            n.input[i] = casts[key]
        nodes.append(n)
    stats["casts"] += len(tail)
    del graph.node[:]
    graph.node.extend(nodes + tail)

    for v in graph.value_info:
        if v.name in dtype and v.type.tensor_type.elem_type == FLOAT:
            v.type.tensor_type.elem_type = dtype[v.name]
    return stats


def _retype_attributes(node, half: int) -> None:
    """A node that computes in half: Cast/ConstantOfShape targets and Constant values follow."""
    import onnx
    from onnx import numpy_helper

    for a in node.attribute:
        if node.op_type == "Cast" and a.name == "to" and a.i == FLOAT:
            a.i = half
        elif node.op_type in ("Constant", "ConstantOfShape") and a.name == "value" and a.t.data_type == FLOAT:
            _to_half(a.t, half)
    if node.op_type == "Constant":
        for a in list(node.attribute):
            if a.name in ("value_float", "value_floats"):
                array = np.array(a.f if a.name == "value_float" else list(a.floats), dtype=np.float32)
                tensor = numpy_helper.from_array(array)
                _to_half(tensor, half)
                node.attribute.remove(a)
                node.attribute.append(onnx.helper.make_attribute("value", tensor))


def _to_half(tensor, half: int) -> None:
    """Convert a float32 TensorProto to fp16 / bf16 in place (raw little-endian storage)."""
    from onnx import numpy_helper

    array = numpy_helper.to_array(tensor)
    if half == FLOAT16:
        raw = array.astype(np.float16).view(np.uint16)
    else:
        import ml_dtypes

        raw = array.astype(ml_dtypes.bfloat16).view(np.uint16)
    tensor.ClearField("float_data")
    tensor.data_type = half
    tensor.raw_data = raw.astype("<u2").tobytes()


def _save(model, out_path: Path) -> tuple[str, ...]:
    import onnx

    weight_bytes = sum(len(t.raw_data) or 4 * len(t.float_data) for t in model.graph.initializer)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if weight_bytes > EXTERNAL_DATA_THRESHOLD:
        data_name = out_path.name + ".data"
        (out_path.parent / data_name).unlink(missing_ok=True)  # onnx appends to an existing data file
        onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        onnx.checker.check_model(str(out_path))
        return (data_name,)
    onnx.save_model(model, str(out_path))
    onnx.checker.check_model(model)
    return ()


# ----------------------------------------------------------------------------------------------
# Validation on CPU


def simulation_model(converted_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """An fp32 copy of a converted model that ONNX Runtime CPU runs, with the half rounding kept.

    Every half initializer becomes the float32 of its half value (exact); every node that computes
    in half computes in float32 and its outputs are rounded with `Cast(to=half) -> Cast(to=float)`;
    Casts to half become that same round trip. fp32 islands are unchanged. So each tensor holds
    exactly the value the half model would store, given fp32 arithmetic inside each op. The I/O
    names, dtypes and shapes are those of the converted model (float32), so `validate_component`
    can check it against PyTorch. Returns `out_path`.
    """
    import onnx

    converted_path, out_path = Path(converted_path), Path(out_path)
    model = onnx.load(str(converted_path), load_external_data=False)
    _load_weights(model, converted_path.parent)
    simulation_graph(model)
    _save(model, out_path)
    return out_path


def simulation_graph(model) -> dict[str, int]:
    """`simulation_model` on a ModelProto, in place. Initializers whose data is elsewhere (external)
    are only retyped to float32: returns {name: stored dtype} for them, so that a reader converts
    their half values to float32 (exactly) when it loads them."""
    import onnx
    from onnx import numpy_helper

    types = _tensor_types(model)
    graph = model.graph
    half_types = (FLOAT16, BFLOAT16)
    stored = {}
    for tensor in graph.initializer:
        if tensor.data_type not in half_types:
            continue
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            stored[tensor.name] = tensor.data_type
            tensor.data_type = FLOAT
        else:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))

    nodes = []
    for n in graph.node:
        half_out = [t for t in n.output if types.get(t) in half_types]
        if n.op_type == "Cast" and types.get(n.output[0]) in half_types:
            target = next(a.i for a in n.attribute if a.name == "to")
            rounded = n.output[0] + "/rounded"
            nodes.append(onnx.helper.make_node("Cast", list(n.input), [rounded], name=n.name, to=target))
            nodes.append(onnx.helper.make_node("Cast", [rounded], list(n.output), name=n.name + "/to_fp32", to=FLOAT))
            continue
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in half_types:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
        if not half_out or n.op_type in ("Constant",):
            nodes.append(n)
            continue
        rename = {t: t + "/fp32" for t in half_out}
        n.output[:] = [rename.get(t, t) for t in n.output]
        nodes.append(n)
        for t in half_out:
            target = types[t]
            nodes.append(onnx.helper.make_node("Cast", [rename[t]], [t + "/rounded"], name=t + "/round", to=target))
            nodes.append(onnx.helper.make_node("Cast", [t + "/rounded"], [t], name=t + "/unround", to=FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    return stored

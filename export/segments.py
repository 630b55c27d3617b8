"""Running an ONNX model too large for memory: consecutive slices of its graph, one at a time.

The nodes (in graph order, which ONNX requires to be topological) are cut into segments whose
weights stay under a byte budget. Each segment becomes a small model: its nodes, its initializers
(read from wherever `values` finds them: the external data file, or a recipe over the checkpoint),
the tensors it reads from earlier segments as inputs, and what later segments (or the caller) read
as outputs. ONNX Runtime runs them in order; a tensor is dropped as soon as nothing later reads it.
So a 24 GB model runs in ~2x the budget, and every intermediate tensor can be observed on the way
(`observe`, for range recording).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from latentrt.graph.view import subgraph_reads, weightless

logger = logging.getLogger(__name__)

ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2, 17: 1, 18: 1, 19: 1, 20: 1}


def tensor_bytes(tensor) -> int:
    """Bytes of an initializer's data from its dims and type (whether or not the data is present)."""
    return int(np.prod(tensor.dims, dtype=np.int64)) * ELEMENT_BYTES.get(tensor.data_type, 4)


@dataclass(frozen=True)
class Segment:
    nodes: tuple[int, ...]  # indices into graph.node
    initializers: tuple[str, ...]
    inputs: tuple[str, ...]  # read from the graph inputs or earlier segments
    outputs: tuple[str, ...]  # read by later segments or returned


def plan_segments(model, budget: int) -> list[Segment]:
    """Cut the graph into segments of at most `budget` bytes of initializers each (a node whose own
    weights exceed it gets a segment of its own)."""
    graph = model.graph
    sizes = {t.name: tensor_bytes(t) for t in graph.initializer}
    reads = [[i for i in list(n.input) + sorted(subgraph_reads(n)) if i] for n in graph.node]
    groups: list[list[int]] = [[]]
    held: set[str] = set()
    total = 0
    for index, names in enumerate(reads):
        new = {n for n in names if n in sizes and n not in held}
        extra = sum(sizes[n] for n in new)
        if groups[-1] and total + extra > budget:
            groups.append([])
            held, total = set(), 0
            new = {n for n in names if n in sizes}
            extra = sum(sizes[n] for n in new)
        groups[-1].append(index)
        held |= new
        total += extra

    last_read: dict[str, int] = {}
    for g, group in enumerate(groups):
        for index in group:
            for name in reads[index]:
                last_read[name] = g
    returned = {o.name for o in graph.output}
    produced_in: dict[str, int] = {}
    segments = []
    for g, group in enumerate(groups):
        node_reads = {name for index in group for name in reads[index]}
        made = {o for index in group for o in graph.node[index].output if o}
        for name in made:
            produced_in[name] = g
        segments.append(
            Segment(
                nodes=tuple(group),
                initializers=tuple(sorted(node_reads & set(sizes))),
                inputs=tuple(sorted(n for n in node_reads - made - set(sizes) if n)),
                outputs=tuple(sorted(n for n in made if n in returned or last_read.get(n, -1) > g)),
            )
        )
    return segments


class SegmentedModel:
    """Runs a model segment by segment with ONNX Runtime on the CPU; `run` has InferenceSession's signature.

    Args:
        model: the ModelProto (its initializers' data may be absent: `values` provides them).
        values: `values(tensor) -> ndarray` for an initializer, of the tensor's dtype.
        budget: the most initializer bytes one segment holds.
        types: {tensor name: ONNX element type} for every tensor crossing a segment boundary
            (from shape inference when not given).

    Example:
        >>> runner = SegmentedModel(model, values=read_from_data_file, budget=1 << 30)  # doctest: +SKIP
        >>> runner.run(["sample"], feeds)  # doctest: +SKIP
    """

    def __init__(self, model, values: Callable[[object], np.ndarray], *, budget: int, types: Mapping[str, int] | None = None) -> None:
        self.model = model
        self.values = values
        self.segments = plan_segments(model, budget)
        self.types = dict(types) if types is not None else element_types(model)
        logger.debug("%d segments of at most %d MB of weights", len(self.segments), budget >> 20)

    def run(
        self,
        output_names: Sequence[str] | None,
        feeds: Mapping[str, np.ndarray],
        *,
        ranges: dict[str, float] | None = None,
    ) -> list[np.ndarray]:
        """Outputs `output_names` (None: the graph's) for `feeds`.

        With `ranges`, it is updated in place with max |value| of every float32 tensor a node
        produces and of every float initializer (finite values; NaN where a tensor held NaN),
        computed inside the segment run (the tensors themselves are not kept).
        """
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        graph = self.model.graph
        wanted = list(output_names) if output_names is not None else [o.name for o in graph.output]
        live = dict(feeds)
        initializers = {t.name: t for t in graph.initializer}
        last_read = {name: k for k, s in enumerate(self.segments) for name in s.inputs}
        for k, segment in enumerate(self.segments):
            nodes = [graph.node[i] for i in segment.nodes]
            outputs = list(segment.outputs)
            measured = []
            if ranges is not None:  # each tensor's reduction right after its producer, so it can be freed at once
                interleaved = [helper.make_node("Constant", [], ["range/zero"], value_float=0.0)]
                for node in nodes:
                    extra, found = _range_nodes([o for o in node.output if o and self.types.get(o) == 1], start=len(measured))
                    interleaved += [node, *extra]
                    measured += found
                nodes = interleaved
                outputs += [name for triple in measured for name in triple[1:]]
            # Weights go to ONNX Runtime as OrtValues over our arrays: no copy in a proto, none in the session.
            arrays = [self.values(initializers[n]) for n in segment.initializers]
            if ranges is not None:
                for n, value in zip(segment.initializers, arrays):
                    if value.dtype.kind == "f" and n not in ranges:  # a weight's range is the same at every call
                        update_range(ranges, n, value)
            stubs, supplied = [], {}
            for n, value in zip(segment.initializers, arrays):
                if value.nbytes < 4096:  # small constants stay in the graph: shape inference reads them
                    stubs.append(numpy_helper.from_array(value, n))
                    continue
                stub = TensorProto(name=n, data_type=initializers[n].data_type, dims=list(value.shape), data_location=TensorProto.EXTERNAL)
                entry = stub.external_data.add()
                entry.key, entry.value = "location", "supplied-at-load"
                stubs.append(stub)
                supplied[n] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
            sub = helper.make_graph(
                nodes,
                "segment",
                [helper.make_tensor_value_info(n, self.types.get(n, 1), None) for n in segment.inputs],
                [helper.make_tensor_value_info(n, self.types.get(n, 1), None) for n in outputs],
                stubs,
            )
            part = helper.make_model(sub, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
            part.functions.extend(self.model.functions)
            options = ort.SessionOptions()
            options.log_severity_level = 3
            # The session runs once: packing its weights for faster repeated GEMMs would only copy them.
            options.add_session_config_entry("session.disable_prepacking", "1")
            if ranges is not None:  # run each reduction right after its producer: measured 8.5 -> 2.2 GB (VAE, 256 px)
                options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
            options.add_external_initializers(list(supplied), list(supplied.values()))
            session = ort.InferenceSession(part.SerializeToString(), options, providers=["CPUExecutionProvider"])
            del part, sub, stubs
            results = dict(zip(outputs, session.run(outputs, {n: live[n] for n in segment.inputs})))
            del session, arrays, supplied, options
            _release_freed_memory()
            for name, peak, nan in measured:
                update_range(ranges, name, np.float32("nan") if results[nan] > 0 else results[peak])
            for name in segment.outputs:
                live[name] = results[name]
            del results
            for name in segment.inputs:
                if last_read[name] == k and name not in wanted:
                    live.pop(name, None)
        return [live[name] for name in wanted]


def _release_freed_memory() -> None:
    """Hand memory freed by a segment back to the system (glibc keeps it otherwise: the process's
    resident size would stay at its largest segment's for the rest of the export)."""
    import ctypes

    libc = ctypes.CDLL(None)  # the process's own symbols: glibc's when it is the C library
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _range_nodes(tensors: Sequence[str], *, start: int = 0) -> tuple[list, list[tuple[str, str, str]]]:
    """Nodes that reduce each float tensor to max |finite value| and a NaN flag (two scalars; they
    read the constant "range/zero"), and (tensor, peak output, NaN output) for each: ranges without
    keeping a single activation."""
    from onnx import TensorProto, helper

    nodes, measured = [], []
    for i, name in enumerate(tensors, start):
        p = f"range/{i}/"
        nodes += [
            helper.make_node("IsInf", [name], [p + "inf"]),
            helper.make_node("Where", [p + "inf", "range/zero", name], [p + "finite"]),
            helper.make_node("Abs", [p + "finite"], [p + "abs"]),
            helper.make_node("ReduceMax", [p + "abs"], [p + "peak"], keepdims=0),
            helper.make_node("IsNaN", [name], [p + "isnan"]),
            helper.make_node("Cast", [p + "isnan"], [p + "nan_float"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMax", [p + "nan_float"], [p + "nan"], keepdims=0),
        ]
        measured.append((name, p + "peak", p + "nan"))
    return nodes, measured


def update_range(ranges: dict[str, float], name: str, value) -> None:
    """ranges[name] = max(ranges[name], max |finite value|), NaN for good once a NaN was seen."""
    import math

    value = np.asarray(value)
    if value.size == 0 or value.dtype.kind not in "fV":
        return
    value = value.astype(np.float32, copy=False)
    if np.isnan(value).any():
        ranges[name] = math.nan
        return
    finite = value[np.isfinite(value)]
    peak = float(np.abs(finite).max()) if finite.size else 0.0
    previous = ranges.get(name, 0.0)
    ranges[name] = previous if math.isnan(previous) else max(previous, peak)


def element_types(model) -> dict[str, int]:
    """{tensor name: ONNX element type} for every typed tensor, from shape inference on a copy
    without the weights (works for models over 2 GB)."""
    import onnx

    graph = model.graph
    skeleton = weightless(model)
    inferred = onnx.shape_inference.infer_shapes(skeleton).graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in list(inferred.input) + list(inferred.value_info) + list(inferred.output):
        if value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types


def written_weights(path, stored: Mapping[str, int] | None = None) -> Callable[[object], np.ndarray]:
    """`values` for a written model at `path`: each initializer read from its external data file
    (only its bytes) or from the proto. `stored` maps initializers retyped since writing (the
    simulation graph's float32 view of half weights) to the dtype their bytes hold."""
    from pathlib import Path

    from onnx import helper, numpy_helper

    base = Path(path).parent
    stored = dict(stored or {})

    def value(tensor) -> np.ndarray:
        if not tensor.external_data:
            return numpy_helper.to_array(tensor)
        entries = {e.key: e.value for e in tensor.external_data}
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(stored.get(tensor.name, tensor.data_type)))
        count = int(np.prod(tensor.dims, dtype=np.int64))
        with open(base / entries["location"], "rb") as f:
            f.seek(int(entries.get("offset", 0)))
            array = np.fromfile(f, dtype=dtype, count=count).reshape(tuple(tensor.dims))  # little-endian hosts only
        target = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        return array.astype(target, copy=False) if array.dtype != target else array

    return value

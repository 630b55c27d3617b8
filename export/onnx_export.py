"""Export one component to ONNX with named dynamic axes and check it numerically against PyTorch."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentrt.errors import ExportError
from latentrt.export.blocks import find_blocks, stitch, trace_glue, trace_template
from latentrt.export.graph_passes import fold_squeeze_ifs, fold_static_shapes, fold_weight_views, fuse_parallel_matmuls, has_data, integer_ranges
from latentrt.export.segments import tensor_bytes
from latentrt.export.tracing import trace_to_onnx
from latentrt.export.weights import ExternalDataWriter, Recipe, inputs_to_weights
from latentrt.graph.view import weightless
from latentrt.models.spec import ComponentExport, TensorTemplate
from latentrt.bundle.manifest import TensorSpec, Validation

logger = logging.getLogger(__name__)

# ONNX protobufs cannot exceed 2 GiB; above this many bytes of weights we write external data.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32}
_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool"}


def make_inputs(specs: tuple[TensorTemplate, ...], sizes: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """Seeded random inputs with the axis `sizes` filled into each input's shape template."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for spec in specs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape)
        dtype = _TORCH_DTYPES[spec.dtype]
        if not dtype.is_floating_point:
            tensors[spec.name] = torch.randint(int(spec.low or 0), int(spec.high), shape, generator=gen, dtype=dtype)
        elif spec.low is not None and spec.high is not None:
            tensors[spec.name] = (torch.rand(shape, generator=gen) * (spec.high - spec.low) + spec.low).to(dtype)
        else:
            tensors[spec.name] = torch.randn(shape, generator=gen).to(dtype)
    return tensors


def _dynamic_shapes(comp: ComponentExport) -> tuple[dict[int, Any], ...]:
    """torch.export dims from the component's named axes; inputs sharing an axis name share one Dim."""
    dims: dict[str, Any] = {}
    for name, axis in comp.axes.items():
        dims[name] = torch.export.Dim(name, min=axis.min, max=axis.max)
    return tuple({i: dims[d] for i, d in enumerate(spec.shape) if isinstance(d, str)} for spec in comp.inputs)


def parameter_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class TracedComponent:
    """An exported graph and where its weights come from.

    `recipes` maps initializers to the checkpoint parameters they are made of (the weight map the
    manifest records). An initializer without data (a block weight of a streamed export) is rebuilt
    from the checkpoint `store` by its recipe when it is written or run.
    """

    model: Any  # onnx.ModelProto
    recipes: dict[str, Recipe] = field(default_factory=dict)
    store: Any = None  # SafetensorsStore
    data_sha256: str = ""  # of the external data file, once written

    def value(self, tensor) -> np.ndarray:
        """An initializer's data, as an array of its ONNX dtype."""
        from onnx import numpy_helper

        if has_data(tensor):
            return numpy_helper.to_array(tensor)
        return self.recipes[tensor.name].evaluate(self.store.get).astype(onnx_numpy_dtype(tensor.data_type))

    @property
    def deferred(self) -> frozenset[str]:
        """The initializers whose data is still in the checkpoint."""
        return frozenset(t.name for t in self.model.graph.initializer if not has_data(t))

    @property
    def weight_bytes(self) -> int:
        return sum(tensor_bytes(t) for t in self.model.graph.initializer)


def onnx_numpy_dtype(data_type: int) -> np.dtype:
    """The numpy dtype of an ONNX tensor type (bfloat16 and float8 through ml_dtypes)."""
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))


def trace_component(comp: ComponentExport, *, opset: int = 18, store=None, streaming: bool = False, progress=None) -> TracedComponent:
    """Trace `comp.module` at its trace sizes and apply the export's graph passes.

    The trace reads no weight (export/tracing.py): each initializer that is a weight of `comp.source`
    gets a recipe over the checkpoint `store` (None: over the module's own loaded weights), read when
    the model is written or run. With `streaming` and block lists (`comp.blocks`), each kind of block
    is traced once and stitched in for every block (export/blocks.py). `progress(step)` is told when
    the graph passes start.
    """
    example = make_inputs(comp.inputs, comp.trace_sizes, seed=0)
    names = dict(input_names=[s.name for s in comp.inputs], output_names=list(comp.output_names), opset=opset, what=f"component {comp.name!r}")
    dynamic_axes = {spec.name: {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)} for spec in comp.inputs + comp.outputs}
    prefix = next(n for n, m in comp.module.named_modules() if m is comp.source)
    strip = len(prefix) + 1 if prefix else 0
    store = ModuleWeights(comp.source) if store is None else store
    recipes: dict[str, Recipe] = {}
    if streaming and comp.blocks:
        blocks = {f"{prefix}.{path}" if prefix else path: b for path, b in find_blocks(comp.source, comp.blocks).items()}
        other = make_inputs(comp.inputs, other_sizes(comp), seed=0)
        model, calls = trace_glue(
            comp.module, blocks, [tuple(other.values()), tuple(example.values())],
            lambda args: trace_to_onnx(comp.module, args, dynamic_axes=dynamic_axes, **names),
        )
        templates = {}
        for call in calls:
            if call.kind not in templates:
                logger.info("%s: tracing the block kind of %s", comp.name, call.path)
                templates[call.kind] = trace_template(call, opset=opset, exporter=comp.exporter)
        recipes = stitch(model, calls, templates, lambda path, name: f"{path[strip:]}.{name}")
    elif comp.exporter == "dynamo":
        model = trace_to_onnx(comp.module, tuple(example.values()), exporter="dynamo", dynamic_shapes=_dynamic_shapes(comp), **names)
    else:
        model = trace_to_onnx(comp.module, tuple(example.values()), dynamic_axes=dynamic_axes, **names)
    state = comp.module.state_dict(keep_vars=True)
    checkpoint = {name: name[strip:] for name in state if name.startswith(prefix)}
    inline = {c: state[n].detach().numpy() for n, c in checkpoint.items() if c not in store and state[n].device.type != "meta"}
    recipes |= inputs_to_weights(model, checkpoint, inline)
    if progress:
        progress("passes")
    _declare_output_shapes(model, comp.outputs)
    fold_weight_views(model, recipes)
    fold_squeeze_ifs(model)
    integer_ranges(model)
    fuse_parallel_matmuls(model, recipes)
    fold_static_shapes(model)
    present = {t.name for t in model.graph.initializer}
    return TracedComponent(model, {k: v for k, v in recipes.items() if k in present}, store)


class ModuleWeights:
    """A module's loaded parameters and buffers, read like a checkpoint store (`get`, `in`)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.tensors = {n: t for n, t in module.state_dict(keep_vars=True).items() if t.device.type != "meta"}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        value = self.tensors[name].detach().numpy()
        return value.astype(dtype) if dtype is not None else value.copy()


def other_sizes(comp: ComponentExport) -> dict[str, int]:
    """Axis sizes that differ from the trace sizes on every axis that can vary (one step of
    `multiple_of` up, or down at the top of the range): what separates dynamic dims from static ones."""
    sizes = dict(comp.trace_sizes)
    for name, axis in comp.axes.items():
        size = sizes.get(name, axis.opt)
        step = axis.multiple_of
        sizes[name] = size + step if axis.contains(size + step) else size - step if axis.contains(size - step) else size
    return sizes


def write_component(traced: TracedComponent, path: Path, *, external: bool | None = None) -> list[str]:
    """Write the traced graph to `path` with its weights; returns the external data file names.

    The weights go into `path.data` (4 KiB aligned, one tensor at a time: never all in memory) when
    they exceed EXTERNAL_DATA_THRESHOLD (or `external` says so), else into the .onnx file.
    """
    import onnx

    model = traced.model
    if external is None:
        external = traced.weight_bytes > EXTERNAL_DATA_THRESHOLD
    if not external:
        for tensor in model.graph.initializer:
            if not has_data(tensor):
                tensor.raw_data = np.ascontiguousarray(traced.value(tensor)).tobytes()
                tensor.data_location = onnx.TensorProto.DEFAULT
        onnx.save_model(model, str(path))
        onnx.checker.check_model(model)
        return []
    data_name = path.name + ".data"
    writer = ExternalDataWriter(path.with_name(data_name))
    try:
        for tensor in model.graph.initializer:
            if tensor_bytes(tensor) >= 1024 or not has_data(tensor):
                writer.write(tensor, traced.value(tensor))
    finally:
        traced.data_sha256 = writer.close()
    onnx.save_model(model, str(path))
    onnx.checker.check_model(weightless(model))  # the checker would read every weight of the data file
    return [data_name]


def export_component(comp: ComponentExport, path: Path, *, opset: int = 18, store=None, streaming: bool = False) -> list[str]:
    """Trace `comp.module` at its trace sizes and write `path` (plus `path.data` for models over 2 GB).

    Returns the external data file names written next to `path` (empty for a single-file model).
    """
    return write_component(trace_component(comp, opset=opset, store=store, streaming=streaming), path)


def _declare_output_shapes(model, templates) -> None:
    """Write the templates' dims (ints and axis names) into the graph outputs.

    The TorchScript exporter names output dims after internal nodes and loses static sizes; the
    validation that follows checks every declared dim against PyTorch's outputs.
    """
    for output, template in zip(model.graph.output, templates):
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        for d in template.shape:
            dim = dims.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d


def io_specs(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The graph's inputs and outputs with dtypes and (symbolic) shapes, after ONNX shape inference
    (on the graph without its weights: nothing of a multi-GB data file is read)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    graph = onnx.shape_inference.infer_shapes(weightless(model)).graph

    def spec(value) -> TensorSpec:
        t = value.type.tensor_type
        dims = tuple(d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim)
        return TensorSpec(name=value.name, dtype=_ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), shape=dims)

    return tuple(spec(v) for v in graph.input if v.name not in weights), tuple(spec(v) for v in graph.output)


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are all zeros)."""
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    denom = np.linalg.norm(e)
    diff = np.linalg.norm(a - e)
    return float(diff / denom) if denom > 0 else float(diff)


def model_runner(path: Path, *, simulate: bool = False, budget: int = 1 << 30):
    """Something with ONNX Runtime's `run(output_names, feeds)` for the written model at `path`.

    A model without external data runs in one session; one with external data runs segment by
    segment (export/segments.py), reading each segment's weights from the data file. `simulate`
    runs the half-precision model's float32 simulation (export/precision.py).
    """
    import onnx
    import onnxruntime as ort

    from latentrt.export.precision import simulation_graph
    from latentrt.export.segments import SegmentedModel, written_weights

    options = ort.SessionOptions()
    options.log_severity_level = 3
    model = onnx.load(str(path), load_external_data=False)
    external = any(t.external_data for t in model.graph.initializer)
    if not external and not simulate:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    stored = simulation_graph(model) if simulate else {}
    if not external:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return SegmentedModel(model, written_weights(path, stored), budget=budget)


def validate_component(
    comp: ComponentExport, path: Path, *, tolerance: float, simulate: bool = False, budget: int = 1 << 30
) -> list[Validation]:
    """Run the written model on ONNX Runtime (CPU) and PyTorch on each of `comp.validate_sizes`; fail
    above `tolerance` relative L2. `simulate`: a half-precision model, run as its float32 simulation.
    The PyTorch module must have its weights (see export/pipeline.py's `_Job.weights`)."""
    session = model_runner(path, simulate=simulate, budget=budget)
    results = []
    for i, sizes in enumerate(comp.validate_sizes):
        inputs = make_inputs(comp.inputs, sizes, seed=1 + i)
        with torch.no_grad():
            expected = comp.module(*inputs.values())
        expected = expected if isinstance(expected, (tuple, list)) else (expected,)
        actual = session.run(list(comp.output_names), {k: v.numpy() for k, v in inputs.items()})
        errors, max_abs = {}, {}
        for name, a, e in zip(comp.output_names, actual, expected):
            e = e.float().numpy()
            declared = next(t.shape for t in comp.outputs if t.name == name)
            expected_shape = tuple(sizes.get(d, n) if isinstance(d, str) else d for d, n in zip(declared, a.shape))
            if a.shape != e.shape or a.shape != expected_shape or len(declared) != a.ndim:
                raise ExportError(
                    f"component {comp.name!r}: output {name!r} has shape {a.shape} in ONNX Runtime, {e.shape} in "
                    f"PyTorch, declared {declared}, for input sizes {sizes}; a dynamic axis was traced as a constant "
                    "or the output template is wrong"
                )
            if not np.isfinite(a).all():
                raise ExportError(f"component {comp.name!r}: output {name!r} has NaN/Inf in ONNX Runtime for sizes {sizes}")
            errors[name], max_abs[name] = rel_l2(a, e), float(np.abs(a.astype(np.float64) - e).max())
        worst = max(errors, key=errors.get)
        logger.info("%s %s: worst relative L2 %.2e (%s)", comp.name, sizes, errors[worst], worst)
        if errors[worst] > tolerance:
            raise ExportError(
                f"component {comp.name!r}: ONNX Runtime disagrees with PyTorch on output {worst!r} for input sizes "
                f"{sizes}: relative L2 error {errors[worst]:.2e} > tolerance {tolerance:.0e}. The export is not "
                "trustworthy; report it with the model config"
            )
        results.append(
            Validation(shapes={k: tuple(v.shape) for k, v in inputs.items()}, rel_l2=errors, max_abs=max_abs)
        )
    return results

"""Export one component to ONNX with named dynamic axes and check it numerically against PyTorch."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentrt.errors import ExportError
from latentrt.export.graph_passes import fold_squeeze_ifs, fold_static_shapes, fuse_parallel_matmuls, integer_ranges
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


def _rms_norm_symbolic(g, input, normalized_shape, weight, eps):
    """aten::rms_norm (torch.nn.RMSNorm, e.g. Flux's q/k norms) decomposed for opsets below 23's RMSNormalization."""
    from torch.onnx import symbolic_helper

    dims = len(symbolic_helper._get_const(normalized_shape, "is", "normalized_shape"))
    eps_value = symbolic_helper._get_const(eps, "f", "eps") if not symbolic_helper._is_none(eps) else None
    if eps_value is None:
        eps_value = torch.finfo(torch.float32).eps
    axes = g.op("Constant", value_t=torch.tensor(list(range(-dims, 0)), dtype=torch.int64))
    mean_square = g.op("ReduceMean", g.op("Mul", input, input), axes, keepdims_i=1)
    rms = g.op("Sqrt", g.op("Add", mean_square, g.op("Constant", value_t=torch.tensor(eps_value, dtype=torch.float32))))
    out = g.op("Div", input, rms)
    return out if symbolic_helper._is_none(weight) else g.op("Mul", out, weight)


def _gelu_symbolic(g, input, approximate="none"):
    """aten::gelu; the tanh approximation as `0.5x * (1 + tanh(0.79788456 * (x + 0.044715 * x^3)))`.

    That is the form ONNX Runtime's FastGeluFusion matches (TorchScript's own writes x^3 as two Muls
    and is left as nine elementwise ops); TensorRT fuses either form. The exact (erf) GELU keeps
    PyTorch's symbolic.
    """
    from torch.onnx import symbolic_helper, symbolic_opset9

    if symbolic_helper._maybe_get_const(approximate, "s") != "tanh":
        return symbolic_opset9.gelu(g, input, approximate)

    def const(value: float):
        return g.op("Constant", value_t=torch.tensor(value, dtype=torch.float32))

    inner = g.op("Add", input, g.op("Mul", g.op("Pow", input, const(3.0)), const(0.044715)))
    tanh = g.op("Tanh", g.op("Mul", inner, const(0.7978845834732056)))
    return g.op("Mul", g.op("Mul", input, const(0.5)), g.op("Add", tanh, const(1.0)))


_EXTRA_SYMBOLICS = {"aten::rms_norm": _rms_norm_symbolic, "aten::gelu": _gelu_symbolic}


@contextlib.contextmanager
def _extra_symbolics(opset: int):
    """Register symbolics that the TorchScript exporter lacks or writes badly, for one export only."""
    for name, fn in _EXTRA_SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, fn, opset)
    try:
        yield
    finally:
        for name in _EXTRA_SYMBOLICS:
            torch.onnx.unregister_custom_op_symbolic(name, opset)


def _dynamic_shapes(comp: ComponentExport) -> tuple[dict[int, Any], ...]:
    """torch.export dims from the component's named axes; inputs sharing an axis name share one Dim."""
    dims: dict[str, Any] = {}
    for name, axis in comp.axes.items():
        dims[name] = torch.export.Dim(name, min=axis.min, max=axis.max)
    return tuple({i: dims[d] for i, d in enumerate(spec.shape) if isinstance(d, str)} for spec in comp.inputs)


def parameter_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def export_component(comp: ComponentExport, path: Path, *, opset: int = 18) -> list[str]:
    """Trace `comp.module` at its trace sizes and write `path` (plus `path.data` for models over 2 GB).

    Returns the external data file names written next to `path` (empty for a single-file model).
    """
    import onnx

    example = make_inputs(comp.inputs, comp.trace_sizes, seed=0)
    dynamic_axes = {
        spec.name: {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)} for spec in comp.inputs + comp.outputs
    }
    large = parameter_bytes(comp.module) > EXTERNAL_DATA_THRESHOLD
    # Trace into a scratch folder: the TorchScript exporter writes one file per tensor for large models.
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch, torch.no_grad(), warnings.catch_warnings(), _extra_symbolics(opset):
        warnings.simplefilter("ignore")  # TracerWarnings about python ints from shapes; validation catches real issues
        traced = Path(scratch) / "model.onnx"
        names = dict(input_names=[s.name for s in comp.inputs], output_names=list(comp.output_names), opset_version=opset)
        try:
            if comp.exporter == "dynamo":
                program = torch.onnx.export(
                    comp.module, tuple(example.values()), dynamic_shapes=_dynamic_shapes(comp), dynamo=True, verbose=False, **names
                )
                program.save(str(traced), external_data=True)
            else:
                torch.onnx.export(
                    comp.module,
                    tuple(example.values()),
                    str(traced),
                    dynamic_axes=dynamic_axes,
                    do_constant_folding=True,
                    dynamo=False,
                    **names,
                )
        except Exception as err:  # the exporters raise many types; name the component
            raise ExportError(f"component {comp.name!r}: torch.onnx.export failed: {err}") from err
        model = onnx.load(str(traced), load_external_data=True)
    _declare_output_shapes(model, comp.outputs)
    fold_squeeze_ifs(model)
    integer_ranges(model)
    fuse_parallel_matmuls(model)
    fold_static_shapes(model)
    if large:
        data_name = path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        onnx.checker.check_model(str(path))
        return [data_name]
    onnx.save_model(model, str(path))
    onnx.checker.check_model(model)
    return []


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
    """The graph's inputs and outputs with dtypes and (symbolic) shapes, after ONNX shape inference."""
    import onnx

    inferred = path.with_suffix(".inferred.onnx")
    onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
    graph = onnx.load(str(inferred), load_external_data=False).graph
    inferred.unlink()

    def spec(value) -> TensorSpec:
        t = value.type.tensor_type
        dims = tuple(d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim)
        return TensorSpec(name=value.name, dtype=_ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), shape=dims)

    return tuple(spec(v) for v in graph.input), tuple(spec(v) for v in graph.output)


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are all zeros)."""
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    denom = np.linalg.norm(e)
    diff = np.linalg.norm(a - e)
    return float(diff / denom) if denom > 0 else float(diff)


def validate_component(comp: ComponentExport, path: Path, *, tolerance: float) -> list[Validation]:
    """Run ONNX Runtime (CPU) and PyTorch on each of `comp.validate_sizes`; fail above `tolerance` relative L2."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
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

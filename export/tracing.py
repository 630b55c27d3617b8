"""PyTorch -> ONNX with either exporter, with the symbolics latentrt adds to the TorchScript one."""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from latentrt.errors import ExportError
from latentrt.export.graph_passes import split_sequences

Exporter = Literal["torchscript", "dynamo"]


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


@contextlib.contextmanager
def zero_weights(module: torch.nn.Module):
    """While active, every parameter of `module` is a scalar broadcast to its shape (stride 0: no
    memory, whatever the parameter held, meta device included). Tied parameters stay tied. Each gets
    its own small value: the TorchScript exporter merges parameters that hold equal values."""
    saved = []
    fakes: dict[int, torch.nn.Parameter] = {}
    for owner in module.modules():
        for attr, param in list(owner._parameters.items()):  # noqa: SLF001
            if param is None:
                continue
            if id(param) not in fakes:
                value = torch.full((), 1e-6 * (len(fakes) + 1), dtype=param.dtype)
                fakes[id(param)] = torch.nn.Parameter(value.expand(param.shape), requires_grad=False)
            saved.append((owner, attr, param))
            owner._parameters[attr] = fakes[id(param)]  # noqa: SLF001
    try:
        yield
    finally:
        for owner, attr, param in saved:
            owner._parameters[attr] = param  # noqa: SLF001


def trace_to_onnx(
    module: torch.nn.Module,
    args: Sequence[torch.Tensor],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int,
    exporter: Exporter = "torchscript",
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    dynamic_shapes: Any = None,
    what: str = "the model",
):
    """Export `module` called on `args`; its parameters and state-dict buffers become graph inputs
    named as in `module.state_dict()` (no weight is read: they are placeholders while tracing), consumed as
    they are (a Linear's weight goes through an explicit Transpose). Returns the ONNX ModelProto.

    "torchscript" takes `dynamic_axes` (input/output name -> {dim: axis name}); "dynamo" takes
    torch.export's `dynamic_shapes`. Both run without their own constant folding, which would bake
    the zeros in; export/graph_passes.py folds what depends only on constants afterwards.

    Raises:
        ExportError: the exporter failed (the message names `what`).
    """
    import onnx

    names = dict(input_names=list(input_names), output_names=list(output_names), opset_version=opset)
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad(), warnings.catch_warnings(), _extra_symbolics(opset), zero_weights(module):
        warnings.simplefilter("ignore")  # TracerWarnings about python ints from shapes; validation catches real issues
        traced = Path(scratch) / "model.onnx"
        try:
            if exporter == "dynamo":
                program = torch.onnx.export(module, tuple(args), dynamic_shapes=dynamic_shapes, dynamo=True, optimize=False, verbose=False, **names)
                program.save(str(traced), include_initializers=False, keep_initializers_as_inputs=True)
            else:
                torch.onnx.export(
                    module, tuple(args), str(traced), dynamic_axes=dynamic_axes or {}, export_params=False,
                    do_constant_folding=False, dynamo=False, **names,
                )
        except Exception as err:  # the exporters raise many types; name the component
            raise ExportError(f"{what}: torch.onnx.export failed: {err}") from err
        model = onnx.load(str(traced))
    if exporter == "dynamo":
        split_sequences(model)
    return model

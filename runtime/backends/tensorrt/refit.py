"""New weights for a refittable TensorRT engine, from arrays or from the bundle's ONNX file.

An engine built with `weights="refittable"` keeps its weights in the plan and can take new ones
without a rebuild (LoRA: merge the adapter into the base weights, refit); one built with
`weights="stripped"` has no weights in the plan and is refitted from the bundle's ONNX at load.
TensorRT names each weight after the ONNX initializer it came from.

`prepare_refit` does everything before the library call, on the host: every new array must name an
initializer of the component's ONNX graph that the engine holds as weights (the build recorded
which), have its shape, and be finite; it is converted to the initializer's dtype (float16,
bfloat16 through ml_dtypes) and made contiguous. The result is ordered as the ONNX file orders
its initializers. `refit_engine` then hands them to TensorRT: `Refitter.set_named_weights` for the
new arrays, the bundle's values for any weight the engine needs along with them
(`get_missing_weights`: weights the builder fused with a changed one), and
`refit_cuda_engine`. `refit_from_onnx` sets every weight from the ONNX file with TensorRT's
`OnnxParserRefitter` (external data included).

Example:
    >>> plan = prepare_refit("bundle/onnx/transformer.onnx", {"model.proj_out.weight": w}, refittable=record.refit["weights"])  # doctest: +SKIP
    >>> engine.refit({"model.proj_out.weight": w})  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentrt.errors import InputError, LatentRTError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Initializer:
    """An ONNX initializer's name, dtype ("float32", "float16", "bfloat16", ...) and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]


def onnx_initializers(onnx_path: str | os.PathLike) -> list[Initializer]:
    """The initializers of an ONNX file, in file order, without reading external data."""
    import onnx
    from onnx import helper

    model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    return [
        Initializer(init.name, np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).name, tuple(int(d) for d in init.dims))
        for init in model.graph.initializer
    ]


def read_initializers(onnx_path: str | os.PathLike, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The values of the named initializers (external data read for those only)."""
    import onnx
    from onnx import numpy_helper

    wanted = set(names)
    path = Path(onnx_path)
    model = onnx.load(os.fspath(path), load_external_data=False)
    found = {init.name: numpy_helper.to_array(init, base_dir=os.fspath(path.parent)) for init in model.graph.initializer if init.name in wanted}
    missing = sorted(wanted - set(found))
    if missing:
        raise InputError(f"{path}: no initializer(s) {missing[:5]} in the ONNX graph")
    return found


def prepare_refit(
    onnx_path: str | os.PathLike,
    weights: Mapping[str, np.ndarray],
    *,
    refittable: Sequence[Mapping[str, Any]] | None = None,
) -> list[tuple[str, np.ndarray]]:
    """Check and convert new weights for a refit; returns (name, array) in the ONNX file's order.

    Args:
        onnx_path: the component's ONNX file in the bundle (the engine was built from it).
        weights: {initializer name: new value}.
        refittable: the weights the engine holds (its metadata's `refit["weights"]`); None skips that check.

    Raises:
        InputError: a name that is not an initializer or not one of the engine's weights, a shape
            that differs, a value that is not finite or cannot be converted; all problems at once.
    """
    initializers = {init.name: init for init in onnx_initializers(onnx_path)}
    held = None if refittable is None else {w["name"] for w in refittable}
    problems, converted = [], {}
    for name, value in weights.items():
        init = initializers.get(name)
        if init is None:
            close = sorted(n for n in initializers if name.split(".")[-1] in n)[:3]
            problems.append(f"{name!r} is not an initializer of {Path(onnx_path).name}" + (f" (similar: {close})" if close else ""))
            continue
        if held is not None and name not in held:
            problems.append(f"{name!r} is not among the engine's refittable weights (the parser folded it into another constant)")
            continue
        array = np.asarray(value)
        if tuple(array.shape) != init.shape:
            problems.append(f"{name!r} has shape {tuple(array.shape)}, the engine's weight has {init.shape}")
            continue
        target = _numpy_dtype(init.dtype)
        if init.dtype in _FLOATS:
            if array.dtype.name not in _FLOATS and array.dtype.kind not in "iu":
                problems.append(f"{name!r} is {array.dtype}, the engine's weight is {init.dtype}")
                continue
            if not np.isfinite(array.astype(np.float32)).all():
                problems.append(f"{name!r} has NaN or infinite values")
                continue
        elif array.dtype != target:
            problems.append(f"{name!r} is {array.dtype}, the engine's weight is {init.dtype} (integer weights are not converted)")
            continue
        converted[name] = np.ascontiguousarray(array.astype(target, copy=False))
    if problems:
        raise InputError("cannot refit the engine with these weights:\n  - " + "\n  - ".join(problems))
    return [(name, converted[name]) for name in initializers if name in converted]


def set_weights_values(
    onnx_path: str | os.PathLike,
    current: Iterable[str],
    weights: Mapping[str, np.ndarray],
    *,
    base: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray] | None:
    """What a refit must set so the engine runs the bundle's weights except `weights` (the engine
    protocol's `set_weights`): `weights` plus, for each initializer set before (`current`) and not
    now, its value in the bundle's ONNX (read once into `base`). None when `weights` is empty: the
    whole engine goes back to the bundle (`refit_from_bundle`), restoring every weight exactly."""
    if not weights:
        return None
    values = dict(weights)
    restore = [name for name in current if name not in values]
    if restore:
        base = {} if base is None else base
        missing = [name for name in restore if name not in base]
        if missing:
            base.update(read_initializers(onnx_path, missing))
        values.update({name: base[name] for name in restore})
    return values


_FLOATS = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn"}


def _numpy_dtype(dtype: str) -> np.dtype:
    try:
        return np.dtype(dtype)
    except TypeError:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, dtype))


# TensorRT DataType names for the numpy dtypes a weight may have.
_TRT_DTYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int8": "INT8", "int32": "INT32", "int64": "INT64", "float8_e4m3fn": "FP8"}


def trt_weights(trt: Any, array: np.ndarray) -> Any:
    """A TensorRT `Weights` over `array`'s memory (no copy: keep `array` alive until the refit returns)."""
    dtype = getattr(trt.DataType, _TRT_DTYPES[array.dtype.name])
    return trt.Weights(dtype, array.ctypes.data, array.size)


def refit_engine(
    trt: Any,
    engine: Any,
    logger: Any,
    onnx_path: str | os.PathLike,
    plan: Sequence[tuple[str, np.ndarray]],
    *,
    from_onnx: bool = False,
) -> list[str]:
    """Refit `engine` (a deserialized ICudaEngine with no work in flight); returns the weight names set.

    Args:
        plan: `prepare_refit`'s output.
        from_onnx: first set every weight from `onnx_path` (TensorRT's ONNX refitter), then `plan`.

    Raises:
        LatentRTError: TensorRT rejected a weight or the refit; the message holds its errors.
    """
    logger.clear()
    refitter = trt.Refitter(engine, logger)
    done: list[str] = []
    if from_onnx:
        parser = trt.OnnxParserRefitter(refitter, logger)
        if not parser.refit_from_file(os.fspath(onnx_path)):
            errors = [parser.get_error(i).desc() for i in range(parser.num_errors)] or logger.errors
            raise LatentRTError(f"TensorRT could not take the weights of {onnx_path}: " + "; ".join(errors))
        done = list(refitter.get_all_weights())
    keep = []
    for name, array in plan:
        keep.append(array)
        if not refitter.set_named_weights(name, trt_weights(trt, array)):
            raise LatentRTError(f"TensorRT rejected the new weight {name!r}: " + "; ".join(logger.errors or ["no error logged"]))
        done.append(name)
    missing = [n for n in refitter.get_missing_weights() if n]
    if missing:
        log.debug("refit: %d weight(s) fused with the new ones are set from %s", len(missing), onnx_path)
        for name, array in read_initializers(onnx_path, missing).items():
            array = np.ascontiguousarray(array)
            keep.append(array)
            if not refitter.set_named_weights(name, trt_weights(trt, array)):
                raise LatentRTError(f"TensorRT rejected weight {name!r} from {onnx_path}: " + "; ".join(logger.errors))
            done.append(name)
    still = [n for n in refitter.get_missing_weights() if n]
    if still or not refitter.refit_cuda_engine():
        raise LatentRTError(
            "TensorRT could not refit the engine"
            + (f" (weights still missing: {still[:5]})" if still else "")
            + ": "
            + "; ".join(logger.errors or ["no error logged"])
        )
    del keep
    return list(dict.fromkeys(done))

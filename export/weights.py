"""Weights that never all live in memory: recipes over the checkpoint, written to external data.

The export traces with the weights as named graph inputs (export/tracing.py); `inputs_to_weights`
turns them into initializers without data, each with a `Recipe`: the checkpoint tensor it is made
of, transposed or reshaped by the graph passes, or several concatenated (the fused Q/K/V weight).
The data is read from the checkpoint (`latentrt.models.checkpoint.SafetensorsStore`), one tensor at
a time, when the model is written or run. The recipes are also the map from a model's parameters to
its ONNX initializers (what LoRA needs).

`ExternalDataWriter` appends tensors one by one to an ONNX external data file (4 KiB aligned, so
ONNX Runtime can map them) and hashes the file while writing.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentrt.errors import InputError

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# Recipes


@dataclass(frozen=True)
class Recipe:
    """How an initializer is made from source parameters.

    `parts` are (checkpoint tensor name, transform) pairs concatenated along `axis` (one part: no
    concat; the export's Q/K/V fusion concatenates), `sizes` each part's extent along `axis` (where
    LoRA finds a part's slice: fused parts need not be equal, e.g. Flux's q, k, v and proj_mlp).
    Transforms: "" (as stored) or "T" (2-D transpose). A single part is then reshaped to `shape`,
    the initializer's shape.
    """

    parts: tuple[tuple[str, str], ...]
    shape: tuple[int, ...]
    axis: int = 0
    reshaped: bool = False  # a single part whose shape is not its tensor's (transposed) shape
    sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.sizes and self.shape:
            object.__setattr__(self, "sizes", (self.shape[self.axis],) if len(self.parts) == 1 else ())

    def renamed(self, rename: Callable[[str], str]) -> Recipe:
        return Recipe(tuple((rename(p), t) for p, t in self.parts), self.shape, self.axis, self.reshaped, self.sizes)

    def evaluate(self, get: Callable[[str], np.ndarray]) -> np.ndarray:
        """The initializer's value, reading each parameter with `get(name)`."""
        arrays = [get(name).T if transform == "T" else get(name) for name, transform in self.parts]
        if len(arrays) == 1:
            return np.ascontiguousarray(arrays[0]).reshape(self.shape)
        return np.concatenate(arrays, axis=self.axis)

    def to_dict(self) -> dict[str, Any]:
        return {"parts": [list(p) for p in self.parts], "shape": list(self.shape), "axis": self.axis, "sizes": list(self.sizes)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        return cls(tuple((p, t) for p, t in d["parts"]), tuple(d["shape"]), int(d.get("axis", 0)), sizes=tuple(d.get("sizes", ())))

    def viewed(self, op: str, shape: tuple[int, ...]) -> Recipe | None:
        """This recipe after a view op (Transpose of a 2-D weight, or a reshape to `shape`), or None
        when a recipe cannot express it."""
        if len(self.parts) != 1:
            return None
        (name, transform), = self.parts
        if op == "Transpose":
            if self.reshaped or len(self.shape) != 2:
                return None
            return Recipe(((name, "" if transform == "T" else "T"),), shape)
        return Recipe(self.parts, shape, reshaped=True)


def inputs_to_weights(model, names: Mapping[str, str], inline: Mapping[str, np.ndarray] | None = None) -> dict[str, Recipe]:
    """Turn the graph inputs that are the model's weights (as `tracing.trace_to_onnx` exports them)
    into initializers named after their checkpoint tensors; returns their recipes.

    Args:
        names: graph input name -> checkpoint tensor name (the data is read from the checkpoint when
            the model is written or run: the initializer is created without data).
        inline: checkpoint name -> value, for weights the checkpoint does not hold (buffers the model
            computes itself): those initializers get their data now and no recipe.
    """
    import onnx
    from onnx import numpy_helper

    inline = dict(inline or {})
    graph = model.graph
    renames, recipes = {}, {}
    for i in reversed(range(len(graph.input))):
        value = graph.input[i]
        if value.name not in names:
            continue
        target = names[value.name]
        tensor_type = value.type.tensor_type
        shape = tuple(d.dim_value for d in tensor_type.shape.dim)
        if target in inline:
            tensor = numpy_helper.from_array(np.asarray(inline[target]).reshape(shape), target)
        else:
            tensor = onnx.TensorProto(name=target, data_type=tensor_type.elem_type, dims=shape, data_location=onnx.TensorProto.EXTERNAL)
            recipes[target] = Recipe(((target, ""),), shape)
        graph.initializer.append(tensor)
        renames[value.name] = target
        del graph.input[i]
    _rename_reads(graph, renames)
    return recipes


def _rename_reads(graph, renames: Mapping[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [renames.get(t, t) for t in node.input]
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _rename_reads(sub, renames)


# ------------------------------------------------------------------------------------------------
# Writing


@dataclass
class ExternalDataWriter:
    """Appends tensors to one external data file and points each TensorProto at its bytes.

    Offsets are aligned to `alignment` bytes (ONNX Runtime maps aligned external data instead of
    reading it). The file's sha256 is computed as it is written (`sha256` after `close`).
    """

    path: Path
    alignment: int = 4096
    _file: Any = field(default=None, init=False, repr=False)
    _digest: Any = field(default_factory=hashlib.sha256, init=False, repr=False)
    offset: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._file = open(self.path, "xb")  # noqa: SIM115 - closed by close()

    def write(self, tensor, value: np.ndarray) -> None:
        """Append `value` (already of the tensor's dtype) and record location, offset and length in `tensor`."""
        from onnx import TensorProto

        pad = -self.offset % self.alignment
        if pad:
            self._put(b"\0" * pad)
        data = np.ascontiguousarray(value)  # ONNX stores little-endian, as every supported host is
        start = self.offset
        self._put(memoryview(data).cast("B"))
        del tensor.external_data[:]
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, val in (("location", self.path.name), ("offset", str(start)), ("length", str(data.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, val

    def _put(self, data) -> None:
        self._file.write(data)
        self._digest.update(data)
        self.offset += len(data) if isinstance(data, bytes) else data.nbytes

    def close(self) -> str:
        """Flush to disk and return the file's sha256."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        return self._digest.hexdigest()

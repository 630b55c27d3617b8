"""Reading a model folder's safetensors without loading them: headers parsed, data memory-mapped.

`SafetensorsStore` reads one file or the shards named by an index json. A tensor is read when asked
for (a copy, converted on the way: bf16 -> float32), and nothing else of the file stays resident.
Headers are checked against the files' sizes up front, so a truncated shard is reported before any
work starts.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentrt.errors import InputError

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
    "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _numpy_dtype(st_dtype: str) -> np.dtype:
    if st_dtype in _ST_DTYPES:
        return np.dtype(_ST_DTYPES[st_dtype])
    import ml_dtypes

    special = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
    if st_dtype not in special:
        raise InputError(f"safetensors dtype {st_dtype!r} is not supported; expected one of {sorted(_ST_DTYPES) + sorted(special)}")
    return np.dtype(special[st_dtype])


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lives: its file, dtype, shape and byte range (from the start of the data section)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    data_start: int  # the file offset of the data section (8 + header length)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, checked against the file's size.

    Raises:
        InputError: the file is truncated, its header is not valid, or a tensor's byte range does not
            fit its dtype and shape or the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InputError(f"{path} is not a safetensors file (only {size} bytes); re-save or re-download it")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8 or length > 100 << 20:
            raise InputError(f"{path}: the header claims {length} bytes but the file has {size}; the file is truncated or not safetensors")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{path}: the safetensors header is not valid JSON ({err}); the file is corrupt") from err
    data_start = 8 + length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from err
        expected = math.prod(shape) * _numpy_dtype(dtype).itemsize
        if end - begin != expected:
            raise InputError(f"{path}: tensor {name!r} has {end - begin} bytes, its dtype {dtype} and shape {list(shape)} need {expected}")
        if data_start + end > size:
            raise InputError(
                f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes; "
                "re-download or re-save the checkpoint"
            )
        tensors[name] = StoredTensor(path, dtype, shape, begin, end, data_start)
    return tensors


class SafetensorsStore:
    """The tensors of one model folder's safetensors, read lazily (memory-mapped, one at a time).

    Args:
        folder: a component folder: `*.safetensors`, or shards named by `*.safetensors.index.json`.

    Raises:
        InputError: no safetensors, an index naming a missing shard, a truncated shard, or a tensor
            named twice.

    Example:
        >>> store = SafetensorsStore("FLUX.1-dev/transformer")  # doctest: +SKIP
        >>> store.get("x_embedder.weight").dtype  # doctest: +SKIP
        dtype('float32')
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        indexes = sorted(self.folder.glob("*.safetensors.index.json"))
        if indexes:
            files = self._shards(indexes[0])
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise InputError(f"{self.folder} has no *.safetensors weights")
        self.tensors: dict[str, StoredTensor] = {}
        for path in files:
            for name, tensor in read_header(path).items():
                if name in self.tensors:
                    raise InputError(f"{self.folder}: tensor {name!r} is in both {self.tensors[name].file.name} and {path.name}")
                self.tensors[name] = tensor

    def _shards(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"{index} is not a valid safetensors index (a JSON object with a 'weight_map'): {err}") from err
        files = []
        for shard in dict.fromkeys(weight_map.values()):
            path = self.folder / shard
            if Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise InputError(f"{index} names the shard {shard!r} outside {self.folder}")
            if not path.is_file():
                raise InputError(f"{index} names the shard {shard}, which is missing from {self.folder}; download the complete checkpoint")
            files.append(path)
        return files

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def numel(self) -> int:
        """Elements of the stored tensors."""
        return sum(math.prod(t.shape) for t in self.tensors.values())

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def is_float(self, name: str) -> bool:
        return self.tensors[name].dtype.startswith(("F", "BF"))

    def get(self, name: str, dtype: Any = np.float32) -> np.ndarray:
        """Tensor `name` as a new array of `dtype` (None keeps the stored dtype).

        Raises:
            InputError: no such tensor.
        """
        if name not in self.tensors:
            raise InputError(f"{self.folder}: the checkpoint has no tensor {name!r}")
        t = self.tensors[name]
        mapped = np.memmap(t.file, dtype=np.uint8, mode="r", offset=t.data_start + t.begin, shape=(t.nbytes,))
        try:
            array = np.frombuffer(mapped, dtype=_numpy_dtype(t.dtype)).reshape(t.shape)
            return np.array(array, dtype=dtype or array.dtype)  # a copy: the mapping is released below
        finally:
            mapped._mmap.close()  # noqa: SLF001 - np.memmap offers no public close

"""Reading a LoRA file: safetensors only, through safetensors' numpy API; pickles are refused.

PyTorch `.bin` / `.pt` / `.ckpt` files are pickles: loading one runs whatever code it holds, so they
are refused before a byte of them is interpreted (a safetensors file starts with an 8-byte header
length and a JSON object; a pickle with 0x80, a zip-packed torch file with "PK").

safetensors' numpy API has no bfloat16 (numpy has none): bf16 and fp8 tensors are read from the
file's own byte ranges (the format's header gives dtype, shape and offsets) as ml_dtypes arrays.
Every tensor comes back as float32.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from latentrt.errors import InputError

_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_NON_NUMPY = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors (as float32) and the header metadata of a LoRA safetensors file.

    Raises:
        InputError: the file is missing, a pickle (.bin/.pt/.ckpt), or not a valid safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"LoRA file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    safetensors = len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8
    if not safetensors:
        if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or head[:4] == b"PK\x03\x04" or path.suffix.lower() in _PICKLES:
            raise InputError(
                f"{path} is a pickled PyTorch file: latentrt reads LoRA weights only from safetensors (a pickle can run code "
                "when loaded). Convert it once where you trust it: `safetensors.torch.save_file(torch.load(f), 'lora.safetensors')`"
            )
        raise InputError(f"{path} is not a safetensors file (no JSON header after the 8-byte length); pass a .safetensors LoRA")
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="np") as f:
            metadata = dict(f.metadata() or {})
            keys = list(f.keys())
            tensors, later = {}, []
            for key in keys:
                try:
                    tensors[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
                except TypeError:  # bfloat16 / float8: numpy has no such dtype
                    later.append(key)
    except InputError:
        raise
    except Exception as err:  # safetensors raises its own SafetensorError
        raise InputError(f"{path} is not a valid safetensors file: {err}") from err
    if later:
        tensors.update(_read_raw(path, later))
    return tensors, metadata


def _read_raw(path: Path, keys: list[str]) -> dict[str, np.ndarray]:
    """bf16 / fp8 tensors read from their byte ranges, as float32."""
    try:
        import ml_dtypes
    except ImportError as err:
        raise InputError(f"{path} holds bfloat16/float8 tensors; reading them needs ml_dtypes: pip install ml-dtypes") from err
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        out = {}
        for key in keys:
            info = header[key]
            name = _NON_NUMPY.get(info["dtype"])
            if name is None:
                raise InputError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which a LoRA cannot hold; expected a float type")
            start, end = info["data_offsets"]
            f.seek(8 + size + start)
            raw = np.frombuffer(f.read(end - start), dtype=getattr(ml_dtypes, name))
            out[key] = raw.astype(np.float32).reshape(info["shape"])
    return out

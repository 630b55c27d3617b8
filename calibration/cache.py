"""TensorRT's calibration cache (text format), for legacy implicit-int8 builds.

    TRT-<version>-EntropyCalibration2
    <tensor name>: <8 hex digits: the big-endian float32 bits of scale = amax / 127>

TensorRT 10 deprecated implicit int8 and TensorRT 11 / TensorRT-RTX removed it; the Q/DQ ONNX is the
primary output. The cache names tensors of the fp32 graph (the inputs of the quantized layers after
smoothing), which are the Q nodes' inputs in the Q/DQ graph.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path

from latentrt.errors import InputError

#: NV_TENSORRT_VERSION of TensorRT 10.8.0 (major * 10000 + minor * 100 + patch).
DEFAULT_TRT_VERSION = 100800
_LINE = re.compile(r"^(?P<name>.+): (?P<hex>[0-9a-fA-F]{8})$")


def scale_hex(scale: float) -> str:
    """The 8 hex digits TensorRT writes for a float32 scale (e.g. 1.0 -> '3f800000')."""
    return struct.pack(">f", scale).hex()


def write_calibration_cache(
    path: str | os.PathLike,
    activation_amax: Mapping[str, float],
    *,
    algorithm: str = "EntropyCalibration2",
    trt_version: int = DEFAULT_TRT_VERSION,
) -> Path:
    """Write `name: hex(amax / 127)` per tensor, after the `TRT-<version>-<algorithm>` header line."""
    lines = [f"TRT-{trt_version}-{algorithm}"]
    for name, amax in activation_amax.items():
        lines.append(f"{name}: {scale_hex(max(float(amax), 1e-12) / 127.0)}")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def read_calibration_cache(path: str | os.PathLike) -> tuple[str, dict[str, float]]:
    """Read a cache back: (header line, {tensor name: scale})."""
    text = Path(path).read_text().splitlines()
    if not text or not text[0].startswith("TRT-"):
        raise InputError(f"{path} is not a TensorRT calibration cache: its first line should be 'TRT-<version>-<algorithm>'")
    scales = {}
    for number, line in enumerate(text[1:], start=2):
        match = _LINE.match(line)
        if not match:
            raise InputError(f"{path}:{number}: expected '<tensor>: <8 hex digits>', got {line!r}")
        scales[match["name"]] = struct.unpack(">f", bytes.fromhex(match["hex"]))[0]
    return text[0], scales

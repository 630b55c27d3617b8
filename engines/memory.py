"""How much device memory engines need, from what the builder reported or the loaded engine says.

A TensorRT engine needs device memory for three things:

- its **weights** (constant for the engine);
- **activations**: scratch memory for intermediate tensors, largest at the profile's max shapes.
  The runtime gives every engine of a pipeline one shared activation buffer (the engines run one
  after the other on one stream), so a pipeline needs the *largest* engine's activations, not
  their sum (NVIDIA's diffusion demo does the same);
- **I/O buffers** for its inputs and outputs; the runtime sizes them for the shapes asked for and
  grows them on demand, so the profile's max is an upper bound.

At build time the numbers come from the builder's log ("Total Activation Memory", "Total Weights
Memory"), recorded in the engine's metadata; at load time from the engine itself
(`device_memory_size_v2`). `pipeline_memory` adds them up the way the runtime allocates them.

Example:
    >>> need = pipeline_memory({"transformer": EngineMemory(4 << 30, 1 << 30, 64 << 20), "vae_decoder": EngineMemory(160 << 20, 6 << 30, 300 << 20)})
    >>> round(need.total / 2**30, 2)  # weights 4.16 GiB + the largest activations 6 GiB + all I/O 0.36 GiB
    10.51
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from latentrt.errors import InputError

# Bytes per element of the dtypes engines exchange with the host.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "float8_e4m3fn": 1,
}
ALIGNMENT = 256  # cudaMalloc returns 256-byte aligned memory; sizes are rounded up to it too

# What TensorRT / TensorRT-RTX builders log at INFO level after a build (TensorRT 10.x, RTX 1.x).
_BUILDER_LINES = {
    "activations": re.compile(r"Total Activation Memory:\s*(\d+)\s*bytes"),
    "weights": re.compile(r"Total Weights Memory:\s*(\d+)\s*bytes"),
    "device_persistent": re.compile(r"Total Device Persistent Memory:\s*(\d+)\s*bytes"),
    "host_persistent": re.compile(r"Total Host Persistent Memory:\s*(\d+)\s*bytes"),
}


def tensor_nbytes(shape: Sequence[int], dtype: str) -> int:
    """Bytes of a dense tensor.

    Raises:
        InputError: unknown dtype, or a negative (unresolved) dimension.
    """
    if dtype not in DTYPE_ITEMSIZE:
        raise InputError(f"dtype {dtype!r} has no known size; expected one of {sorted(DTYPE_ITEMSIZE)}")
    if any(int(d) < 0 for d in shape):
        raise InputError(f"shape {tuple(shape)} has an unresolved (negative) dimension; a buffer needs concrete sizes")
    return math.prod(int(d) for d in shape) * DTYPE_ITEMSIZE[dtype]


def aligned(nbytes: int, alignment: int = ALIGNMENT) -> int:
    """`nbytes` rounded up to `alignment`, at least `alignment` (a zero-sized tensor still needs an address)."""
    return max(alignment, -(-int(nbytes) // alignment) * alignment)


def parse_builder_memory(messages: Iterable[str]) -> dict[str, int]:
    """The memory totals a builder logged: {"activations", "weights", "device_persistent", "host_persistent"}
    (only those it logged), in bytes.

    Example:
        >>> parse_builder_memory(["Total Activation Memory: 9183232 bytes", "Total Weights Memory: 206208 bytes"])
        {'activations': 9183232, 'weights': 206208}
    """
    found: dict[str, int] = {}
    for message in messages:
        for key, pattern in _BUILDER_LINES.items():
            match = pattern.search(message)
            if match:
                found[key] = int(match[1])
    return found


@dataclass(frozen=True)
class EngineMemory:
    """Device memory of one engine, in bytes (None: not known).

    Attributes:
        weights: the engine's weights (and persistent device memory).
        activations: scratch memory at the profile's max shapes.
        io: input and output buffers at the profile's max shapes.
        source: "builder" (the build log, recorded in the metadata) or "engine" (the loaded engine).
    """

    weights: int | None
    activations: int | None
    io: int | None
    source: Literal["builder", "engine"] = "builder"

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "activations": self.activations, "io": self.io, "source": self.source}


@dataclass(frozen=True)
class PipelineMemory:
    """What a pipeline's engines need together: every engine's weights and I/O buffers, and one
    shared activation buffer as large as the largest engine's activations."""

    engines: dict[str, EngineMemory]

    @property
    def weights(self) -> int:
        return sum(m.weights or 0 for m in self.engines.values())

    @property
    def activations(self) -> int:
        """The shared activation buffer: the largest engine's."""
        return max((m.activations or 0 for m in self.engines.values()), default=0)

    @property
    def io(self) -> int:
        return sum(m.io or 0 for m in self.engines.values())

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.io

    @property
    def unknown(self) -> list[str]:
        """Components with a number missing (the total undercounts them)."""
        return [name for name, m in self.engines.items() if None in (m.weights, m.activations, m.io)]

    @property
    def activations_if_not_shared(self) -> int:
        """What one static activation allocation per engine would take (TensorRT's default)."""
        return sum(m.activations or 0 for m in self.engines.values())


def pipeline_memory(engines: Mapping[str, EngineMemory]) -> PipelineMemory:
    return PipelineMemory(dict(engines))


def io_bytes_at_max(
    profile: Mapping[str, Any],
    inputs: Sequence[Mapping[str, Any]],
    outputs: Sequence[Mapping[str, Any]],
    *,
    vae_scale_factor: int | None = None,
) -> int | None:
    """I/O buffer bytes at a profile's max shapes, without a GPU (for `latentrt inspect`).

    Inputs use the profile's max shapes; outputs resolve their axes from the profile's axes, with
    `height` / `width` = `latent_height` / `latent_width` x `vae_scale_factor` (the VAE decoder's
    image). None when an output has an axis that cannot be resolved that way.

    Args:
        profile: the engine's profile (`ComponentProfile.to_dict()`: "axes" and "shapes").
        inputs, outputs: the manifest's tensor specs as dicts (name, dtype, shape).
    """
    axes = {name: int(sizes[2]) for name, sizes in profile.get("axes", {}).items()}
    if vae_scale_factor:
        for image, latent in (("height", "latent_height"), ("width", "latent_width")):
            if latent in axes:
                axes.setdefault(image, axes[latent] * vae_scale_factor)
    total = 0
    shapes = profile.get("shapes", {})
    for spec in inputs:
        if spec["name"] in shapes:
            shape = shapes[spec["name"]]["max"]
        else:
            shape = _resolve(spec["shape"], axes)
            if shape is None:
                return None
        total += aligned(tensor_nbytes(shape, spec["dtype"]))
    for spec in outputs:
        shape = _resolve(spec["shape"], axes)
        if shape is None or spec["dtype"] not in DTYPE_ITEMSIZE:
            return None
        total += aligned(tensor_nbytes(shape, spec["dtype"]))
    return total


def _resolve(shape: Sequence[int | str], axes: Mapping[str, int]) -> tuple[int, ...] | None:
    out = []
    for dim in shape:
        if isinstance(dim, str):
            if dim not in axes:
                return None
            out.append(axes[dim])
        else:
            out.append(int(dim))
    return tuple(out)


def format_bytes(nbytes: int | None) -> str:
    """ "1.5 GiB", "12.0 MiB", "-" for None."""
    if nbytes is None:
        return "-"
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.2f} GiB"
    return f"{nbytes / 2**20:.1f} MiB"

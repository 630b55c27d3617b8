"""The engine protocol: the one thing the pipeline knows about a backend.

An engine runs one component of a bundle (a text encoder, the denoiser, the VAE decoder)::

    outputs = engine({"input_ids": ids})          # {name: ndarray} -> {name: ndarray}
    engine.inputs, engine.outputs                 # the manifest's TensorSpecs
    engine.close()                                # frees what the engine holds (sessions, device memory)

Every backend (runtime/backends/<name>/) implements it and exposes
`load_engines(bundle, manifest, options) -> {component: Engine}`; `runtime/backends/__init__.py`
maps backend names to those modules. Optional capabilities are methods an engine may have, looked up
by the pipeline with `getattr`:

- `device_loop(latent_input, velocity_output)`: an object whose `run(...)` performs every
  flow-matching step of a call on the device (TensorRT: runtime/backends/tensorrt/loop.py).
- `set_weights({initializer: array})`: run with the bundle's weights except these (LoRA,
  runtime/lora/); `{}` restores the bundle's weights exactly. ONNX Runtime re-creates its session
  from memory, TensorRT refits its engines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from latentrt.bundle.manifest import TensorSpec
from latentrt.errors import InputError

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


def check_feeds(inputs: Sequence[TensorSpec], feeds: dict[str, np.ndarray]) -> None:
    """Every input of `inputs` is in `feeds` with the manifest's dtype and rank, or an InputError
    naming it (what an engine checks before it runs)."""
    for spec in inputs:
        if spec.name not in feeds:
            raise InputError(f"missing input {spec.name!r}; this engine takes {[s.name for s in inputs]}")
        array = feeds[spec.name]
        expected = NUMPY_DTYPES.get(spec.dtype)
        if expected is not None and array.dtype != expected:
            raise InputError(f"input {spec.name!r} has dtype {array.dtype}, expected {spec.dtype}")
        if len(array.shape) != len(spec.shape):
            raise InputError(f"input {spec.name!r} has shape {array.shape}, expected rank {len(spec.shape)} {spec.shape}")


@runtime_checkable
class Engine(Protocol):
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class OnDevice:
    """A feed whose data is already in device memory: only its shape travels with the call."""

    shape: tuple[int, ...]


@dataclass(frozen=True)
class BackendOptions:
    """How a backend loads a bundle's engines; each backend reads the fields that concern it.

    Attributes:
        providers: ONNX Runtime execution providers (None: CPU).
        threads: intra-op threads (0 lets the library choose).
        device: the CUDA device ordinal (TensorRT).
    """

    providers: Sequence[str] | None = None
    threads: int = 0
    device: int = 0

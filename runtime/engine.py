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

"""Loaded adapters, the active mix, and the initializer values it gives each component.

`LoraAdapters` belongs to a `Pipeline`. Loading a file reads and checks it completely (keys,
ranks, shapes against the bundle, finite values) before anything changes, so a bad file leaves the
pipeline as it was. `activate(names, weights)` computes, per component, the initializers the mix
touches and their merged values

    W' = W + sum over active adapters of  weight x (alpha / rank) x B @ A

(in float32 from the bundle's values, cast back to the initializer's dtype; re-quantized for int8
/ fp8 weights) and hands each changed component's engine the complete set with `set_weights`:
components the mix does not touch keep their engines as they are.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentrt.bundle.manifest import Manifest
from latentrt.errors import BundleError, InputError
from latentrt.runtime.lora.files import read_lora_file
from latentrt.runtime.lora.formats import LoraLayer, parse_lora
from latentrt.runtime.lora.weights import ComponentWeights, lora_delta, read_initializers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Adapter:
    """A LoRA file read and resolved against a bundle: its layers per component."""

    name: str
    path: str
    sha256: str
    layers: tuple[LoraLayer, ...]

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(sorted({layer.component for layer in self.layers}))

    @property
    def nbytes(self) -> int:
        """Memory the adapter holds (its A and B matrices)."""
        seen, total = set(), 0
        for layer in self.layers:
            for array in (layer.down, layer.up):
                base = array.base if array.base is not None else array
                if id(base) not in seen:
                    seen.add(id(base))
                    total += base.nbytes
        return total


def component_weights_of(manifest: Manifest, bundle: str | os.PathLike) -> dict[str, ComponentWeights]:
    """The weight maps of the components that have parameters a LoRA may adapt (all but the VAE).

    Raises:
        BundleError: the bundle has no weight maps (exported before LoRA support): re-export it.
    """
    out = {}
    for name, comp in manifest.components.items():
        if name == "vae_decoder":
            continue
        out[name] = ComponentWeights(name, comp.weights, bundle=bundle)
    return out


class LoraAdapters:
    """The adapters a pipeline has loaded and the values their mix gives its initializers."""

    def __init__(self, bundle: str | os.PathLike, manifest: Manifest, denoiser: str) -> None:
        self.bundle = Path(bundle)
        self.manifest = manifest
        self.denoiser = denoiser
        self.adapters: dict[str, Adapter] = {}
        self._weights: dict[str, ComponentWeights] | None = None
        self._base: dict[str, dict[str, np.ndarray]] = {}

    @property
    def weights(self) -> dict[str, ComponentWeights]:
        if self._weights is None:
            self._weights = component_weights_of(self.manifest, self.bundle)
        return self._weights

    def read(self, path: str | os.PathLike, name: str) -> Adapter:
        """Read and check a LoRA file against this bundle (nothing is changed).

        Raises:
            InputError: the name is taken, or the file is not a LoRA for this bundle (see `parse_lora`).
            BundleError: the bundle has no weight map (re-export it).
        """
        if not isinstance(name, str) or not name:
            raise InputError(f"adapter_name must be a non-empty string, got {name!r}")
        if name in self.adapters:
            raise InputError(
                f"an adapter named {name!r} is already loaded (from {self.adapters[name].path}); pick another adapter_name "
                "or remove it first with delete_adapters"
            )
        if not isinstance(path, (str, os.PathLike)):
            raise InputError(f"the LoRA must be a path to a .safetensors file, got {type(path).__name__}")
        path = Path(path)
        tensors, metadata = read_lora_file(path)
        layers = parse_lora(
            tensors, metadata, family=self.manifest.family, denoiser=self.denoiser, weights=self.weights, source=str(path)
        )
        for layer in layers:  # every place a layer writes to is checked now, not at the first swap
            self.weights[layer.component].placements(layer.param)
        return Adapter(name, str(path), _sha256(path), tuple(layers))

    def add(self, adapter: Adapter) -> None:
        self.adapters[adapter.name] = adapter

    def check_mix(self, names, weights) -> list[tuple[str, dict[str, float]]]:
        """`set_adapters`' arguments as [(adapter, {component: weight})], checked.

        `weights` may be None (1.0 each), one number for all, or one entry per adapter: a number or
        a {component: number} dict (components left out get 1.0).

        Raises:
            InputError: an unknown or repeated name, a weights list of another length, a weight that
                is not a finite number, a component the bundle lacks.
        """
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise InputError(f"adapter_names must be a name or a list of names, got {names!r}")
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise InputError(f"no adapter named {unknown}; loaded: {sorted(self.adapters) or 'none'} (load one with load_lora_weights)")
        if len(set(names)) != len(names):
            raise InputError(f"adapter_names lists an adapter twice: {list(names)}")
        if weights is None:
            weights = [1.0] * len(names)
        elif isinstance(weights, (int, float, dict)) and not isinstance(weights, bool):
            weights = [weights] * len(names)
        if not isinstance(weights, (list, tuple)) or len(weights) != len(names):
            raise InputError(
                f"adapter_weights has {len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__} entries for "
                f"{len(names)} adapter(s) {list(names)}; pass one weight per adapter"
            )
        mix = []
        for name, weight in zip(names, weights):
            per = weight if isinstance(weight, dict) else {c: weight for c in self.adapters[name].components}
            for component, value in per.items():
                if component not in self.manifest.components:
                    raise InputError(f"adapter_weights for {name!r} names component {component!r}; this bundle has {', '.join(self.manifest.components)}")
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                    raise InputError(f"adapter weight {value!r} for {name!r} is not a finite number")
            mix.append((name, {c: float(per.get(c, 1.0)) for c in self.adapters[name].components}))
        return mix

    def overrides(self, mix: Sequence[tuple[str, Mapping[str, float]]]) -> dict[str, tuple[tuple, dict[str, np.ndarray]]]:
        """Per component the mix touches: (a key naming what was mixed, {initializer: merged value})."""
        per_param: dict[str, dict[str, list]] = {}
        keys: dict[str, list] = {}
        for name, weights in mix:
            for layer in self.adapters[name].layers:
                weight = weights.get(layer.component, 1.0)
                if weight == 0.0:
                    continue
                per_param.setdefault(layer.component, {}).setdefault(layer.param, []).append((weight * layer.scale, layer))
                keys.setdefault(layer.component, [])
                if (name, weight) not in keys[layer.component]:
                    keys[layer.component].append((name, weight))
        out = {}
        for component, params in per_param.items():
            cw = self.weights[component]
            deltas: dict[str, list] = {}
            for param, contributions in params.items():
                delta = None
                for scale, layer in contributions:
                    d = lora_delta(layer.down, layer.up) * np.float32(scale)
                    delta = d if delta is None else delta + d
                for placement in cw.placements(param):
                    deltas.setdefault(placement.initializer, []).append((placement, delta))
            base = self._base_values(component, cw.base_names(deltas))
            values: dict[str, np.ndarray] = {}
            for initializer, items in deltas.items():
                values.update(cw.merged(initializer, base, items))
            out[component] = (tuple(keys[component]), values)
        return out

    def _base_values(self, component: str, names: set[str]) -> dict[str, np.ndarray]:
        """Bundle values of `names` (read from the component's ONNX once, then kept)."""
        cache = self._base.setdefault(component, {})
        missing = names - set(cache)
        if missing:
            comp = self.manifest.components[component]
            cache.update(read_initializers(self.bundle / comp.file, missing))
        return cache

    @property
    def base_nbytes(self) -> int:
        return sum(a.nbytes for values in self._base.values() for a in values.values())

    def remove(self, names: Sequence[str]) -> None:
        for name in names:
            self.adapters.pop(name, None)
        if not self.adapters:
            self._base.clear()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["Adapter", "LoraAdapters", "component_weights_of", "BundleError"]

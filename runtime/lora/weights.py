"""Where a model parameter lives in a bundle, and its new value once LoRA deltas are added.

The export records, per component, each initializer's recipe over the checkpoint's tensors
(`Component.weights`, written by export/weights.py's `Recipe`)::

    {"parts": [[tensor, "" | "T"], ...], "shape": [...], "axis": k, "sizes": [...]}

parts concatenated along `axis` (`sizes`: each part's extent there), "T" a 2-D transpose. A bundle
calibrated by `latentrt calibrate` adds, for initializers SmoothQuant scaled or that were quantized:

    "factor":    {"axis": a, "values": [...]}       value = recipe * values (broadcast along axis a)
    "quantized": {"precision": "int8" | "fp8", "scale": initializer, "axis": c}
                 stored as round(value / scale) per channel c; `scale` holds the per-channel scales

`ComponentWeights` reads that map (and nothing else: names are never guessed) and answers where a
parameter's delta goes. `merged` computes an initializer's new value from its bundle value and the
deltas of the parameters it holds: `W + sum(delta)` in float32, cast back to the stored dtype, or,
for a quantized weight, dequantized, summed and re-quantized per output channel with new scales
(the activation scales of the graph are not touched).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentrt.errors import BundleError, InputError
from latentrt.graph.quantize import dequantize_weight, quantize_weight, weight_scales


@dataclass(frozen=True)
class Placement:
    """One parameter's place in an initializer: part `index` of its recipe, `size` entries from
    `offset` along the recipe's axis, stored as is ("") or transposed ("T")."""

    initializer: str
    index: int
    offset: int
    size: int
    transform: str


@dataclass(frozen=True)
class WeightRecipe:
    """An initializer's recipe (see the module docstring), parsed and checked."""

    parts: tuple[tuple[str, str], ...]
    shape: tuple[int, ...]
    axis: int
    sizes: tuple[int, ...]
    factor_axis: int | None = None
    factor: np.ndarray | None = None
    quantized: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any], where: str) -> WeightRecipe:
        try:
            parts = tuple((str(p), str(t)) for p, t in d["parts"])
            shape = tuple(int(s) for s in d["shape"])
            axis = int(d.get("axis", 0))
            sizes = tuple(int(s) for s in d.get("sizes", ()))
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"{where}: weight recipe of {name!r} is malformed ({err!r}); re-export the bundle") from err
        if not parts or any(t not in ("", "T") for _, t in parts) or (shape and not 0 <= axis < len(shape)):
            raise BundleError(f"{where}: weight recipe of {name!r} is malformed ({dict(d)!r}); re-export the bundle")
        if len(parts) == 1 and not sizes and shape:
            sizes = (shape[axis],)
        factor, factor_axis = None, None
        if "factor" in d:
            factor_axis = int(d["factor"]["axis"])
            factor = np.asarray(d["factor"]["values"], np.float32)
            if not 0 <= factor_axis < len(shape) or factor.shape != (shape[factor_axis],):
                raise BundleError(f"{where}: the SmoothQuant factor of {name!r} does not fit its shape {shape}; re-export the bundle")
        quantized = dict(d["quantized"]) if "quantized" in d else None
        if quantized is not None and (quantized.get("precision") not in ("int8", "fp8") or not isinstance(quantized.get("scale"), str)):
            raise BundleError(f"{where}: the quantization record of {name!r} is malformed ({quantized!r}); re-calibrate the bundle")
        return cls(parts, shape, axis, sizes, factor_axis, factor, quantized)


class ComponentWeights:
    """A component's weight map: parameter -> its placements, initializer -> recipe.

    Raises:
        BundleError: the component has no weight map (a bundle exported before LoRA support: re-export
            it) or a recipe is malformed.
    """

    def __init__(self, component: str, weights: Mapping[str, Any], *, bundle: str | os.PathLike = "") -> None:
        where = f"{bundle}: component {component!r}" if bundle else f"component {component!r}"
        if not weights:
            raise BundleError(
                f"{where} has no weight map (initializer -> checkpoint tensors) in its manifest: the bundle was exported by a "
                "latentrt without LoRA support. Re-export it with `latentrt export` to load LoRA adapters"
            )
        self.component = component
        self.recipes = {name: WeightRecipe.from_dict(name, d, where) for name, d in weights.items()}
        self.params: dict[str, list[Placement]] = {}
        self._fused_without_sizes: set[str] = set()
        for name, recipe in self.recipes.items():
            if len(recipe.sizes) != len(recipe.parts) or (recipe.shape and sum(recipe.sizes) != recipe.shape[recipe.axis]):
                for part, _ in recipe.parts:
                    self._fused_without_sizes.add(part)
                continue
            offset = 0
            for i, ((part, transform), size) in enumerate(zip(recipe.parts, recipe.sizes)):
                self.params.setdefault(part, []).append(Placement(name, i, offset, size, transform))
                offset += size
        self.modules = {p.rsplit(".", 1)[0] for p in self.params if p.endswith(".weight")}
        self.modules |= {p.rsplit(".", 1)[0] for p in self._fused_without_sizes if p.endswith(".weight")}

    def knows(self, param: str) -> bool:
        return param in self.params or param in self._fused_without_sizes

    def placements(self, param: str) -> list[Placement]:
        """Where `param` lives (usually one initializer; a weight read twice may live in two).

        Raises:
            BundleError: the parameter is fused with others and the bundle does not record the parts'
                sizes (exported before they were recorded): re-export it.
        """
        if param not in self.params and param in self._fused_without_sizes:
            raise BundleError(
                f"component {self.component!r}: {param} is fused with other weights and the manifest does not record each "
                "part's size (a bundle exported by an older latentrt); re-export it with `latentrt export`"
            )
        return self.params[param]

    def param_shape(self, param: str) -> tuple[int, ...]:
        """The parameter's shape as the checkpoint stores it (a reshaped part: the stored shape)."""
        p = self.placements(param)[0]
        recipe = self.recipes[p.initializer]
        shape = list(recipe.shape)
        if recipe.shape:
            shape[recipe.axis] = p.size
        return tuple(reversed(shape)) if p.transform == "T" else tuple(shape)

    def add_delta(self, value: np.ndarray, placement: Placement, delta: np.ndarray) -> None:
        """Add a parameter's `delta` (in the parameter's own layout) into `value`, the float32
        initializer, at `placement` (scaled by the recipe's SmoothQuant factor, if any)."""
        recipe = self.recipes[placement.initializer]
        d = delta.T if placement.transform == "T" else delta
        if len(recipe.parts) == 1:
            target = value
        else:
            index = [slice(None)] * value.ndim
            index[recipe.axis] = slice(placement.offset, placement.offset + placement.size)
            target = value[tuple(index)]
        d = d.reshape(target.shape)
        if recipe.factor is not None:
            factor = recipe.factor
            if len(recipe.parts) > 1 and recipe.factor_axis == recipe.axis:  # this part's slice of the factor
                factor = factor[placement.offset : placement.offset + placement.size]
            shape = [1] * value.ndim
            shape[recipe.factor_axis] = -1
            d = d * factor.reshape(shape)
        target += d

    def base_names(self, initializers: Iterable[str]) -> set[str]:
        """The initializers whose bundle values `merged` needs: these and their quantization scales."""
        names = set()
        for name in initializers:
            names.add(name)
            q = self.recipes[name].quantized
            if q is not None:
                names.add(q["scale"])
        return names

    def merged(self, name: str, base: Mapping[str, np.ndarray], deltas: Iterable[tuple[Placement, np.ndarray]]) -> dict[str, np.ndarray]:
        """Initializer `name`'s new value (and its new scales, if quantized) with `deltas` added.

        Args:
            base: bundle values of the initializers `base_names` named.
            deltas: (placement in `name`, parameter delta in the parameter's layout).
        """
        recipe = self.recipes[name]
        stored = base[name]
        q = recipe.quantized
        axis = int(q.get("axis", 0)) if q is not None else 0
        if q is not None:
            value = dequantize_weight(stored, base[q["scale"]], axis)
        else:
            value = np.array(stored, dtype=np.float32)
        for placement, delta in deltas:
            self.add_delta(value, placement, delta)
        if not np.isfinite(value).all():
            raise InputError(
                f"component {self.component!r}: the merged weight {name!r} has NaN or infinite values (the adapters' weights are "
                "too large for its dtype); lower the adapter weights"
            )
        if q is None:
            if stored.dtype == np.float16 and np.abs(value).max(initial=0) > 65504:
                raise InputError(f"component {self.component!r}: the merged weight {name!r} overflows float16; lower the adapter weights")
            return {name: value.astype(stored.dtype)}
        scales = weight_scales(value, axis, q["precision"])
        return {name: quantize_weight(value, scales, axis, q["precision"]), q["scale"]: scales.astype(base[q["scale"]].dtype).reshape(base[q["scale"]].shape)}


def component_weights(manifest, component: str, bundle: str | os.PathLike = "") -> ComponentWeights:
    """`ComponentWeights` of a manifest's component (see that class for the errors)."""
    return ComponentWeights(component, manifest.components[component].weights, bundle=bundle)


def read_initializers(onnx_path: str | os.PathLike, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The values of the named initializers of an ONNX file (external data read for those only).

    Raises:
        BundleError: a name is not an initializer of the file (the manifest and the ONNX disagree).
    """
    import onnx
    from onnx import numpy_helper

    wanted = set(names)
    path = Path(onnx_path)
    model = onnx.load(os.fspath(path), load_external_data=False)
    found = {}
    for init in model.graph.initializer:
        if init.name in wanted:
            found[init.name] = numpy_helper.to_array(init, base_dir=os.fspath(path.parent))
    missing = sorted(wanted - set(found))
    if missing:
        raise BundleError(f"{path}: the manifest's weight map names initializer(s) {missing[:5]} that the ONNX file lacks; re-export the bundle")
    return found


def lora_delta(down: np.ndarray, up: np.ndarray) -> np.ndarray:
    """`up @ down` in the layout of the weight they adapt: [out, in] for a Linear, [out, in, kh, kw]
    for a Conv (down [r, in, kh, kw], up [out, r, 1, 1], as PEFT and kohya store a conv LoRA)."""
    rank = down.shape[0]
    if down.ndim == 2:
        return up.reshape(up.shape[0], rank) @ down
    return (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(up.shape[0], *down.shape[1:])


def delta_shape(down: np.ndarray, up: np.ndarray) -> tuple[int, ...]:
    return (up.shape[0], *down.shape[1:])


def numel(shape: Iterable[int]) -> int:
    return math.prod(shape)

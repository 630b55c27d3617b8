"""`merge_lora_bundle`: a bundle with adapters merged into its weights for good (`latentrt lora`).

For deployments that want fixed weights: the result is an ordinary bundle (any backend, engines
built from it as usual). Each component an adapter touches is rewritten with its merged
initializers (new sha256s, external data rewritten when the component has some); every other file
is hard-linked (or copied). The manifest records which adapters were merged at which weights, and
the sha256 each rewritten component had before (`extra["lora"]`). Built engines are not carried
over: they hold the old weights. The weight map is kept, so more adapters can go on top.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from latentrt.bundle.manifest import Manifest, load_manifest, sha256_file
from latentrt.bundle.writer import link_bundle_files, writing_bundle
from latentrt.errors import InputError
from latentrt.runtime.families import FAMILIES
from latentrt.runtime.lora.adapters import LoraAdapters

logger = logging.getLogger(__name__)


def merge_lora_bundle(
    bundle: str | os.PathLike,
    output: str | os.PathLike,
    loras: Sequence[tuple[str | os.PathLike, float]],
    *,
    overwrite: bool = False,
) -> Manifest:
    """Write `output`: `bundle` with each (LoRA file, weight) of `loras` merged into its weights.

    Raises:
        InputError: no LoRA given, a LoRA that does not fit the bundle (see `Pipeline.load_lora_weights`),
            or an unusable output (as for `latentrt export`).
        BundleError: the bundle is invalid or has no weight map (re-export it).

    Example:
        >>> merge_lora_bundle("bundles/sd3", "bundles/sd3-style", [("style.safetensors", 0.8)])  # doctest: +SKIP
    """
    import onnx
    from onnx import numpy_helper

    if not loras:
        raise InputError("give at least one LoRA to merge (--lora FILE[:WEIGHT])")
    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    adapters = LoraAdapters(bundle, manifest, FAMILIES[manifest.family].denoiser)
    mix = []
    for i, (path, weight) in enumerate(loras):
        adapter = adapters.read(path, f"lora_{i}")
        adapters.add(adapter)
        mix.append((adapter.name, {c: float(weight) for c in adapter.components}))
    overrides = adapters.overrides(mix)
    inputs = {"input bundle": bundle} | {f"LoRA {i}": p for i, (p, _) in enumerate(loras)}
    with writing_bundle(output, overwrite=overwrite, inputs=inputs) as tmp:
        rewritten = {}
        skip = set()
        for name in overrides:
            comp = manifest.components[name]
            skip |= {comp.file, *comp.external_data}
        link_bundle_files(bundle, tmp, skip)
        for name, (_, values) in overrides.items():
            comp = manifest.components[name]
            model = onnx.load(os.fspath(bundle / comp.file))
            for tensor in model.graph.initializer:
                if tensor.name in values:
                    tensor.CopyFrom(numpy_helper.from_array(values[tensor.name], tensor.name))
            target = tmp / comp.file
            target.parent.mkdir(parents=True, exist_ok=True)
            hashes = ()
            if comp.external_data:
                location = Path(comp.external_data[0]).name
                onnx.save_model(model, os.fspath(target), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=1024)
                hashes = tuple(sha256_file(tmp / data) for data in comp.external_data)
            else:
                onnx.save_model(model, os.fspath(target))
            del model
            rewritten[name] = replace(comp, sha256=sha256_file(target), external_sha256=hashes)
            logger.info("%s: %d initializers merged", name, len(values))
        record = {
            "adapters": [
                {"file": Path(adapter.path).name, "sha256": adapter.sha256, "weight": weight, "components": list(adapter.components)}
                for adapter, (_, weight) in zip(adapters.adapters.values(), loras)
            ],
            "base_sha256": {name: manifest.components[name].sha256 for name in rewritten},
        }
        previous = manifest.extra.get("lora")
        if previous:
            record["merged_before"] = previous
        new = replace(manifest, components={**manifest.components, **rewritten}, extra={**manifest.extra, "lora": record})
        new.save(tmp)
    return new



__all__ = ["merge_lora_bundle"]

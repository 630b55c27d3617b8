"""`quantize_bundle`: a bundle -> a new bundle whose denoiser is an int8 or fp8 Q/DQ ONNX graph.

1. Validate everything up front (bundle, prompts, options, opset) before writing anything.
2. Select the layers: MatMul/Gemm/Conv with constant weights, minus the default and user exclusions
   (graph.py); attention MatMuls and Softmax stay high precision.
3. With SmoothQuant: collect per-channel max |x| of the linear layers' inputs over the trajectory,
   fold the smoothing scales into the fp32 graph (smoothquant.py).
4. Collect per-tensor histograms of the (smoothed) layers' inputs over the trajectory (collect.py)
   and pick each range by percentile, entropy or minmax (histogram.py).
5. Insert Q/DQ (qdq.py), write the ONNX, a TensorRT calibration cache next to it, and the manifest
   with a `quantization` record in `extra`; the bundle is built in a temporary sibling directory and
   renamed, so a failure leaves nothing behind.

fp8 needs opset 19 (QuantizeLinear with a float8e4m3fn zero point). A component exported at opset
18 is re-stamped to 19: the ops whose definitions changed between 18 and 19 (Cast, Reshape, Pad,
Resize, Shape, Size, Equal, AveragePool, Identity, If/Loop/Scan, Constant, Q/DQ) only gained types,
attributes or modes with defaults that keep opset-18 behaviour. Older opsets are refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from latentrt._version import __version__
from latentrt.calibration.collect import StatsCollector, TrajectorySettings, collect_statistics, tap_model
from latentrt.calibration.graph import DEFAULT_EXCLUDES, GraphIndex, attention_matmuls, find_layers, select_layers
from latentrt.calibration.histogram import DEFAULT_BINS, entropy_amax, percentile_amax
from latentrt.calibration.prompts import default_prompts, load_prompts, prompts_sha256, select_prompts
from latentrt.calibration.qdq import FP8_MIN_OPSET, insert_qdq, model_opset
from latentrt.calibration.smoothquant import smooth_graph
from latentrt.errors import BundleError, InputError
from latentrt.bundle.writer import check_disjoint, check_output_dir, link_bundle_files, writing_bundle
from latentrt.bundle.manifest import Component, Manifest, load_manifest, sha256_file

logger = logging.getLogger(__name__)

Method = Literal["percentile", "entropy", "minmax"]
QUANTIZED_PRECISIONS = ("int8", "fp8")
#: Opsets re-stamped to 19 for fp8 (see the module docstring); anything older is refused.
FP8_RESTAMPABLE_OPSETS = (18,)
_LARGE = 1 << 31


@dataclass(frozen=True)
class QuantizeConfig:
    """How to calibrate and quantize a bundle's denoiser. Round-trips through JSON.

    Attributes:
        precision: "int8" or "fp8" (E4M3, scales amax / 448).
        method: activation range from the |x| histogram: "percentile", "entropy" (TensorRT's
            IInt8EntropyCalibrator2) or "minmax".
        percentile: for "percentile", in (0, 100].
        smoothquant_alpha: SmoothQuant migration strength in [0, 1] for the linear layers' inputs;
            None disables smoothing.
        exclude: regular expressions (re.search on node names) excluding more layers.
        force: regular expressions of layers quantized although a default rule keeps them in high
            precision (`exclude` still wins). For experiments: `latentrt debug` measures what
            quantizing such a layer costs.
        prompts_file: calibration prompts, one per line; None: the default list (prompts.py).
        num_prompts: how many prompts (the first N of the list).
        steps: denoising steps per prompt (None: the bundle's default).
        guidance_scale: None: the bundle's default (uncond and cond rows are both calibrated).
        seed: seeds the initial latents (prompt batch k uses seed + k).
        num_bins: histogram bins (a power of two, >= 256 for entropy's 128-bin search start).
        overwrite: replace an existing non-empty output directory.
    """

    precision: Literal["int8", "fp8"] = "int8"
    method: Method = "percentile"
    percentile: float = 99.99
    smoothquant_alpha: float | None = 0.8
    exclude: tuple[str, ...] = ()
    force: tuple[str, ...] = ()
    prompts_file: str | None = None
    num_prompts: int = 32
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    num_bins: int = DEFAULT_BINS
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.precision not in QUANTIZED_PRECISIONS:
            raise InputError(f"precision must be 'int8' or 'fp8', got {self.precision!r}")
        if self.method not in ("percentile", "entropy", "minmax"):
            raise InputError(f"method must be 'percentile', 'entropy' or 'minmax', got {self.method!r}")
        if not (isinstance(self.percentile, (int, float)) and 0.0 < self.percentile <= 100.0):
            raise InputError(f"percentile must be in (0, 100], got {self.percentile!r}; 99.99 keeps all but the rarest outliers")
        if self.smoothquant_alpha is not None and not (0.0 <= self.smoothquant_alpha <= 1.0):
            raise InputError(f"smoothquant_alpha must be in [0, 1] (or None to disable smoothing), got {self.smoothquant_alpha!r}")
        import re

        for option in ("exclude", "force"):
            patterns = getattr(self, option)
            object.__setattr__(self, option, (patterns,) if isinstance(patterns, str) else tuple(patterns))
            for pattern in getattr(self, option):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise InputError(f"{option} pattern {pattern!r} is not a valid regular expression: {err}") from err
        if self.prompts_file is not None:
            object.__setattr__(self, "prompts_file", os.fspath(self.prompts_file))
        if not (isinstance(self.num_prompts, int) and self.num_prompts >= 1):
            raise InputError(f"num_prompts must be >= 1, got {self.num_prompts!r}")
        if self.steps is not None and not (isinstance(self.steps, int) and self.steps >= 1):
            raise InputError(f"steps must be >= 1, got {self.steps!r}")
        if not (isinstance(self.num_bins, int) and self.num_bins >= 256 and self.num_bins & (self.num_bins - 1) == 0):
            raise InputError(f"num_bins must be a power of two >= 256, got {self.num_bins!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        d["force"] = list(self.force)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantizeConfig:
        d = dict(d)
        d["exclude"] = tuple(d.get("exclude", ()))
        d["force"] = tuple(d.get("force", ()))
        return cls(**d)


def is_quantized(manifest: Manifest) -> bool:
    return "quantization" in manifest.extra or any(c.precision in QUANTIZED_PRECISIONS for c in manifest.components.values())


def quantize_bundle(
    bundle: str | os.PathLike,
    output: str | os.PathLike,
    config: QuantizeConfig = QuantizeConfig(),
    *,
    prompts: Sequence[str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Manifest:
    """Calibrate the bundle's denoiser on its own pipeline and write a quantized copy of the bundle.

    Args:
        bundle: an fp32 bundle written by `latentrt export`.
        output: the new bundle's directory (written to a temporary sibling, then renamed).
        prompts: calibration prompts; overrides `config.prompts_file` and the defaults.
        progress: called as `progress(stage, done, total)` with stage "smoothquant statistics" or
            "activation statistics" after each batch of prompts.

    Returns:
        the new bundle's manifest; `manifest.extra["quantization"][component]` records precision,
        method, parameters, excluded layers, the quantized node count and the prompts' sha256.

    Example:
        >>> quantize_bundle("bundles/sd3", "bundles/sd3-int8", QuantizeConfig(precision="int8"))  # doctest: +SKIP
    """
    import onnx

    from latentrt.runtime.families import FAMILIES

    # 1. Validate.
    bundle, output = Path(bundle), Path(output)
    manifest = load_manifest(bundle)
    if is_quantized(manifest):
        raise InputError(f"{bundle} is already quantized; calibrate the fp32 bundle it was made from instead")
    inputs = {"input bundle": bundle, "prompts file": config.prompts_file}
    check_disjoint(output, inputs)
    check_output_dir(output, config.overwrite)
    if prompts is not None:
        prompt_list = [p for p in prompts if p.strip()]
        if not prompt_list:
            raise InputError("the prompt list is empty; pass at least one prompt")
    elif config.prompts_file is not None:
        prompt_list = load_prompts(config.prompts_file)
    else:
        prompt_list = default_prompts(manifest, config.num_prompts, seed=config.seed)
    prompt_list = select_prompts(prompt_list, config.num_prompts)
    name = FAMILIES[manifest.family].denoiser
    comp = manifest.components[name]
    model = onnx.load(os.fspath(bundle / comp.file))
    opset = model_opset(model)
    if config.precision == "fp8" and opset < FP8_MIN_OPSET and opset not in FP8_RESTAMPABLE_OPSETS:
        raise InputError(
            f"component {name!r} is ONNX opset {opset}: fp8 needs QuantizeLinear with a float8e4m3fn zero point "
            f"(opset >= {FP8_MIN_OPSET}), and latentrt re-stamps only opset 18 graphs to 19; re-export with --opset 19"
        )

    # 2. Select layers.
    layers = find_layers(GraphIndex(model))
    selected, excluded, unmatched = select_layers(layers, defaults=DEFAULT_EXCLUDES, user=config.exclude, force=config.force)
    for pattern in unmatched:
        option = "--exclude" if pattern in config.exclude else "force pattern"
        logger.warning("%s %r matches no quantizable layer of %s; layer names look like %r", option, pattern, name, layers[0].node if layers else "")
    if not selected:
        raise InputError(f"no layer of {name!r} is left to quantize after the exclusions; drop some --exclude patterns")
    settings = TrajectorySettings(steps=config.steps, guidance_scale=config.guidance_scale, seed=config.seed)

    with writing_bundle(output, overwrite=config.overwrite, inputs=inputs) as tmp:
        work = tmp / ".calibration"
        work.mkdir()

        def run(stage: str, collector: StatsCollector, graph) -> StatsCollector:
            path = work / "tapped.onnx"
            _save(tap_model(graph, collector.stats), path)
            report = (lambda done, total: progress(stage, done, total)) if progress else None
            collect_statistics(bundle, manifest, path, collector, prompt_list, settings, progress=report)
            return collector

        # 3. SmoothQuant.
        smoothing = None
        smoothed: dict = {}  # new initializer -> (initializer it scales, factor, axis)
        quantized: dict = {}  # quantized weight -> (float weight, scale initializer, axis)
        if config.smoothquant_alpha is not None:
            linear_inputs = list(dict.fromkeys(l.activation for l in selected if l.input_axis is not None))
            stats = run("smoothquant statistics", StatsCollector([], histograms=False, channels=linear_inputs), model).stats
            smoothing = smooth_graph(model, selected, {k: s.channel_absmax for k, s in stats.items()}, config.smoothquant_alpha, derived=smoothed)
            layers = find_layers(GraphIndex(model))
            keep = {l.node for l in selected}
            selected = [l for l in layers if l.node in keep]

        # 4. Activation ranges.
        activations = list(dict.fromkeys(l.activation for l in selected))
        collector = run(
            "activation statistics", StatsCollector(activations, histograms=config.method != "minmax", bins=config.num_bins), model
        )
        amax = {t: _amax(collector.stats[t], config) for t in activations}

        # 5. Q/DQ, files, manifest.
        attention = attention_matmuls(GraphIndex(model))
        count = insert_qdq(model, selected, amax, config.precision, quantized=quantized)
        shutil.rmtree(work)
        link_bundle_files(bundle, tmp, skip={comp.file, *comp.external_data})
        onnx_path = tmp / comp.file
        external = _save(model, onnx_path)
        _check_model(onnx_path)
        cache = onnx_path.with_suffix(".calibration.cache")
        from latentrt.calibration.cache import write_calibration_cache

        write_calibration_cache(cache, amax, algorithm="MinMaxCalibration" if config.method == "minmax" else "EntropyCalibration2")
        record = {
            "precision": config.precision,
            "method": config.method,
            "parameters": {
                "percentile": config.percentile if config.method == "percentile" else None,
                "smoothquant_alpha": config.smoothquant_alpha,
                "num_bins": config.num_bins,
                "steps": config.steps or manifest.defaults.num_inference_steps,
                "guidance_scale": manifest.defaults.guidance_scale if config.guidance_scale is None else config.guidance_scale,
                "seed": config.seed,
                "exclude": list(config.exclude),
                "force": list(config.force),
            },
            "quantized_nodes": count,
            "excluded_layers": excluded,
            "high_precision_attention_matmuls": len(attention),
            "smoothquant": None if smoothing is None else smoothing.to_dict(),
            "num_prompts": len(prompt_list),
            "prompts_sha256": prompts_sha256(prompt_list),
            "calibration_cache": cache.relative_to(tmp).as_posix(),
            "opset": model_opset(model),
            "source_sha256": comp.sha256,
            "source_bundle": os.fspath(bundle.resolve()),  # where `latentrt debug` finds the fp32 reference
            "latentrt_version": __version__,
        }
        new_comp = Component(
            file=comp.file,
            sha256=sha256_file(onnx_path),
            inputs=comp.inputs,
            outputs=comp.outputs,
            axes=comp.axes,
            precision=config.precision,
            opset=model_opset(model),
            external_data=tuple(f"{Path(comp.file).parent.as_posix()}/{n}" for n in external),
            validation=(),
            weights=quantized_weight_map(comp.weights, smoothed, quantized, {t.name for t in model.graph.initializer}, config.precision),
        )
        extra = dict(manifest.extra)
        extra["quantization"] = {name: json.loads(json.dumps(record))}
        new_manifest = Manifest(
            family=manifest.family,
            components={**manifest.components, name: new_comp},
            tokenizers=manifest.tokenizers,
            latent=manifest.latent,
            scheduler=manifest.scheduler,
            defaults=manifest.defaults,
            conditioning=manifest.conditioning,
            source=manifest.source,
            latentrt_version=manifest.latentrt_version,
            schema_version=manifest.schema_version,
            extra=extra,
        )
        new_manifest.save(tmp)
    return new_manifest


def quantized_weight_map(
    weights: Mapping[str, Any], smoothed: Mapping[str, tuple], quantized: Mapping[str, tuple], present: set[str], precision: str
) -> dict[str, Any]:
    """The fp32 bundle's weight map carried through SmoothQuant and Q/DQ: each initializer of the
    quantized graph that holds model parameters gets its recipe, with the SmoothQuant `factor` it
    was multiplied by and, for a quantized weight, its `quantized` record (precision, per-channel
    scale initializer, axis). runtime/lora/weights.py reads it."""

    def recipe(name: str) -> dict | None:
        if name in weights:
            return dict(weights[name])
        if name in smoothed:
            source, factor, axis = smoothed[name]
            base = recipe(source)
            if base is None:
                return None
            values = np.asarray(factor, np.float64)
            if "factor" in base:  # scaled twice: the factors multiply (same axis only)
                if base["factor"]["axis"] != axis:
                    return None
                values = values * np.asarray(base["factor"]["values"], np.float64)
            base["factor"] = {"axis": int(axis), "values": [float(v) for v in values.astype(np.float32)]}
            return base
        return None

    out = {}
    for name in sorted(present):
        if name in quantized:
            source, scale, axis = quantized[name]
            base = recipe(source)
            if base is not None:
                base["quantized"] = {"precision": precision, "scale": scale, "axis": int(axis)}
                out[name] = base
        else:
            base = recipe(name)
            if base is not None:
                out[name] = base
    return out


def _amax(stats, config: QuantizeConfig) -> float:
    if config.method == "minmax" or stats.histogram is None:
        return stats.absmax
    if config.method == "entropy":
        return entropy_amax(stats.histogram)
    return percentile_amax(stats.histogram, config.percentile)


def _save(model, path: Path) -> list[str]:
    """Save an ONNX model; over 2 GB its weights go to `<name>.data` next to it. Returns external files."""
    import onnx

    if model.ByteSize() < _LARGE:
        onnx.save(model, os.fspath(path))
        return []
    data = f"{path.name}.data"
    onnx.save(model, os.fspath(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
    return [data]


def _check_model(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(os.fspath(path))
    except onnx.checker.ValidationError as err:
        raise BundleError(f"the quantized graph {path.name} is not valid ONNX ({err}); please report this with the bundle's source") from err



__all__ = ["QuantizeConfig", "is_quantized", "quantize_bundle"]

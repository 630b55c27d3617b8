"""`export_pipeline`: a diffusers pipeline directory (or a preset) -> a validated ONNX bundle."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from latentrt._version import __version__
from latentrt.errors import ExportError, InputError
from latentrt.export.onnx_export import export_component, io_specs, validate_component
from latentrt.models import families
from latentrt.models.loader import load_pipeline, read_model_index
from latentrt.models.presets import PRESETS, save_preset
from latentrt.bundle.writer import writing_bundle
from latentrt.bundle.manifest import Component, Manifest, TokenizerSpec, jsonable, sha256_file

logger = logging.getLogger(__name__)

# Relative L2 against the fp32 PyTorch module. bf16 keeps 8 significant bits, eight times fp16's
# rounding error per stored tensor; on tiny-sd3 its VAE measures 2.2e-2 (fp16: 2.8e-3).
HALF_TOLERANCE = {"fp16": 1e-2, "bf16": 3e-2}
# Prompts whose real activations decide the fp32 islands (two steps of the default size each).
RANGE_PROMPTS = ("a photo of a red cat on the left", "a large purple mountain in the snow at night")


@dataclass(frozen=True)
class ExportConfig:
    """How to export a pipeline.

    Attributes:
        opset: ONNX opset (>= 18: LayerNormalization and GroupNormalization are native ops).
        max_batch: the most images per call the bundle is validated and profiled for.
        max_sequence_length: T5 token length prompts are padded to; None keeps the family's
            default (SD3 256, Flux 512, PixArt 120, as diffusers), 0 drops the T5 tokens (SD3).
        precision: fp32, or fp16 / bf16 with automatic fp32 islands (export/precision.py); graph
            inputs and outputs stay float32.
        vae_precision: "fp32" keeps the VAE decoder in fp32 whatever `precision` is.
        tolerance: the largest relative L2 error between ONNX Runtime and PyTorch accepted for fp32;
            half precision is held to HALF_TOLERANCE.
        overwrite: replace an existing non-empty output directory.
    """

    opset: int = 18
    max_batch: int = 4
    max_sequence_length: int | None = None
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    vae_precision: Literal["same", "fp32"] = "same"
    tolerance: float = 1e-4
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.precision not in HALF_TOLERANCE and self.precision != "fp32":
            raise InputError(f"precision must be fp32, fp16 or bf16, got {self.precision!r}")
        if self.vae_precision not in ("same", "fp32"):
            raise InputError(f"vae_precision must be 'same' or 'fp32', got {self.vae_precision!r}")
        if self.opset < 18:
            raise InputError(f"opset {self.opset} is too old: latentrt exports opset >= 18 (native normalization ops)")
        if self.max_batch < 1:
            raise InputError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_sequence_length is not None and not 0 <= self.max_sequence_length <= 512:
            raise InputError(f"max_sequence_length must be in [0, 512], got {self.max_sequence_length}")


def export_pipeline(
    source: str | os.PathLike,
    output: str | os.PathLike,
    config: ExportConfig = ExportConfig(),
    *,
    progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Export every component of a text-to-image pipeline to ONNX, validate each, and write a bundle.

    Args:
        source: a diffusers pipeline directory, or the name of a built-in preset (e.g. "tiny-sd3").
        output: the bundle directory to create. It is written to a temporary sibling and renamed,
            so a failed or interrupted export leaves nothing behind.
        progress: called with the name of each step as it starts (the CLI draws it).

    Example:
        >>> export_pipeline("tiny-sd3", "bundles/tiny-sd3")  # doctest: +SKIP
    """
    source_str = str(source)
    inputs = {"source pipeline": source_str if Path(source_str).exists() else None}
    with writing_bundle(output, overwrite=config.overwrite, inputs=inputs) as tmp:
        if source_str in PRESETS and not Path(source_str).exists():
            pipeline_dir = save_preset(source_str, tmp / "preset-source")
        elif Path(source_str).is_dir():
            pipeline_dir = Path(source_str)
        else:
            raise InputError(
                f"{source_str!r} is neither a built-in preset ({', '.join(sorted(PRESETS))}) nor a pipeline directory"
            )
        manifest = _export_into(pipeline_dir, tmp, config, source_str, progress)
        if pipeline_dir.parent == tmp:
            shutil.rmtree(pipeline_dir)
    return manifest


def _export_into(pipeline_dir: Path, bundle: Path, config: ExportConfig, source: str, progress) -> Manifest:
    class_name = read_model_index(pipeline_dir).get("_class_name", "")
    family = families.for_pipeline_class(class_name, pipeline_dir)
    loaded = load_pipeline(pipeline_dir, family.required, family.optional)
    lengths = {} if config.max_sequence_length is None else {"max_sequence_length": config.max_sequence_length}
    spec = family.describe(loaded, max_batch=config.max_batch, **lengths)

    (bundle / "onnx").mkdir()
    components = {}
    for comp in spec.components:
        if progress:
            progress(comp.name)
        rel = f"onnx/{comp.name}.onnx"
        path = bundle / rel
        logger.info("exporting %s", comp.name)
        external = export_component(comp, path, opset=config.opset)
        validation = validate_component(comp, path, tolerance=config.tolerance)
        inputs, outputs = io_specs(path)
        components[comp.name] = Component(
            file=rel,
            sha256=sha256_file(path),
            inputs=inputs,
            outputs=outputs,
            axes=comp.axes,
            precision="fp32",
            opset=config.opset,
            external_data=tuple(f"onnx/{name}" for name in external),
            validation=tuple(validation),
        )

    tokenizers = {}
    for folder, (tok, max_length) in spec.tokenizers.items():
        (bundle / folder).mkdir()
        tok.backend_tokenizer.save(str(bundle / folder / "tokenizer.json"))
        if tok.pad_token_id is None:
            raise InputError(f"tokenizer {folder!r} in {pipeline_dir} has no pad token; set pad_token in its tokenizer_config.json")
        tokenizers[folder] = TokenizerSpec(file=f"{folder}/tokenizer.json", max_length=max_length, pad_id=tok.pad_token_id)

    manifest = Manifest(
        family=spec.family,
        components=components,
        tokenizers=tokenizers,
        latent=spec.latent,
        scheduler=jsonable(spec.scheduler),
        defaults=spec.defaults,
        conditioning=spec.conditioning,
        source=source,
        latentrt_version=__version__,
    )
    manifest.save(bundle)
    if config.precision != "fp32":
        manifest = _convert_half(bundle, manifest, spec, config, progress)
        manifest.save(bundle)
    return manifest


def _convert_half(bundle: Path, manifest: Manifest, spec, config: ExportConfig, progress) -> Manifest:
    """Convert the validated fp32 bundle's components to fp16/bf16, validate each, update the manifest."""
    from latentrt.export.precision import convert_precision, record_ranges, simulation_model

    feeds = _record_feeds(bundle)
    components = dict(manifest.components)
    tolerance = HALF_TOLERANCE[config.precision]
    for comp in spec.components:
        if comp.name == "vae_decoder" and config.vae_precision == "fp32":
            continue
        if progress:
            progress(f"{comp.name} -> {config.precision}")
        fp32_path = bundle / components[comp.name].file
        half_path = fp32_path.with_name(f"{comp.name}.{config.precision}.onnx")
        ranges = record_ranges(fp32_path, feeds[comp.name])
        report = convert_precision(fp32_path, half_path, config.precision, ranges, opset=22 if config.precision == "bf16" else None)
        check = simulation_model(half_path, fp32_path.with_name(f"{comp.name}.check.onnx"))
        try:
            validation = validate_component(comp, check, tolerance=tolerance)
        finally:
            for f in check.parent.glob(f"{comp.name}.check.onnx*"):
                f.unlink()
        for old in [fp32_path, *(bundle / f for f in components[comp.name].external_data)]:
            old.unlink()
        final = fp32_path
        half_path.rename(final)
        external = []
        for data in report.external_data:
            (half_path.parent / data).rename(final.parent / f"{final.name}.data")
            external.append(f"onnx/{final.name}.data")
        if external:
            _point_external_data(final, f"{final.name}.data")
        if config.precision == "fp16":  # ONNX Runtime CPU runs fp16 graphs (it has no bf16 kernels)
            _check_loads(final)
        inputs, outputs = io_specs(final)
        components[comp.name] = replace(
            components[comp.name],
            sha256=sha256_file(final),
            inputs=inputs,
            outputs=outputs,
            precision=config.precision,
            opset=22 if config.precision == "bf16" else components[comp.name].opset,
            external_data=tuple(external),
            validation=tuple(validation),
            precision_report=report.to_dict(),
        )
    return replace(manifest, components=components)


def _record_feeds(bundle: Path, max_per_component: int = 4) -> dict[str, list[dict]]:
    """Real inputs of every component: the fp32 bundle generating RANGE_PROMPTS for two steps."""
    from latentrt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, verify=False)
    seen: dict[str, list[dict]] = {name: [] for name in pipe.engines}

    def recording(name, engine):
        def call(feeds):
            if len(seen[name]) < max_per_component:
                seen[name].append({k: v.copy() for k, v in feeds.items()})
            return engine(feeds)

        return call

    recorder = Pipeline(bundle, pipe.manifest, {n: recording(n, e) for n, e in pipe.engines.items()})
    for i, prompt in enumerate(RANGE_PROMPTS):
        recorder(prompt, num_inference_steps=2, seed=i)
    return seen


def _check_loads(path: Path) -> None:
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types
        raise ExportError(f"the converted model {path.name} does not load in ONNX Runtime: {err}") from err


def _point_external_data(path: Path, location: str) -> None:
    """Rewrite the external-data location of every tensor in `path` (after renaming its data file)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(path))


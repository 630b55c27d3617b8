"""`export_pipeline`: a diffusers pipeline directory (or a preset) -> a validated ONNX bundle."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from latentrt._version import __version__
from latentrt.bundle.manifest import Component, Manifest, TensorSpec, TokenizerSpec, jsonable, sha256_file
from latentrt.bundle.writer import writing_bundle
from latentrt.errors import ExportError, InputError
from latentrt.export.blocks import find_blocks
from latentrt.export.onnx_export import _ONNX_DTYPES, TracedComponent, io_specs, trace_component, validate_component, write_component
from latentrt.models import families
from latentrt.models.checkpoint import SafetensorsStore
from latentrt.models.loader import load_pipeline, materialize, read_model_index, release, weights_per_call
from latentrt.models.presets import PRESETS, save_preset
from latentrt.models.spec import ComponentExport

logger = logging.getLogger(__name__)

# Relative L2 against the fp32 PyTorch module. bf16 keeps 8 significant bits, eight times fp16's
# rounding error per stored tensor; on tiny-sd3 its VAE measures 2.2e-2 (fp16: 2.8e-3).
HALF_TOLERANCE = {"fp16": 1e-2, "bf16": 3e-2}
# Prompts whose real activations decide the fp32 islands (two steps each, at the default size up to
# RANGE_SIZE pixels a side: the ranges are per channel and token, not per resolution).
RANGE_PROMPTS = ("a photo of a red cat on the left", "a large purple mountain in the snow at night")
RANGE_SIZE = 256


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
        streaming: "on" traces each kind of block once and reads block weights from the checkpoint
            one block at a time (export, validation and fp32 islands in bounded memory); "auto" does
            it for components over 1 GiB of float32 weights; "off" traces and holds whole models.
    """

    opset: int = 18
    max_batch: int = 4
    max_sequence_length: int | None = None
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    vae_precision: Literal["same", "fp32"] = "same"
    tolerance: float = 1e-4
    overwrite: bool = False
    streaming: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self) -> None:
        if self.precision not in HALF_TOLERANCE and self.precision != "fp32":
            raise InputError(f"precision must be fp32, fp16 or bf16, got {self.precision!r}")
        if self.vae_precision not in ("same", "fp32"):
            raise InputError(f"vae_precision must be 'same' or 'fp32', got {self.vae_precision!r}")
        if self.opset < 18:
            raise InputError(f"opset {self.opset} is too old: latentrt exports opset >= 18 (native normalization ops)")
        if self.max_batch < 1:
            raise InputError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.streaming not in ("auto", "on", "off"):
            raise InputError(f"streaming must be 'auto', 'on' or 'off', got {self.streaming!r}")
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


# Components whose float32 weights exceed this stream when `streaming="auto"` (and declare blocks).
STREAM_THRESHOLD = 1 << 30
# The most initializer bytes one validation/range segment holds (export/segments.py).
SEGMENT_BUDGET = 1 << 30


@dataclass
class _Job:
    """One component's export: its description, its checkpoint, and whether its blocks stream."""

    comp: ComponentExport
    store: SafetensorsStore
    streaming: bool
    precision: str
    traced: TracedComponent | None = None

    @property
    def blocks(self) -> dict:
        return find_blocks(self.comp.source, self.comp.blocks) if self.streaming else {}

    @contextlib.contextmanager
    def weights(self):
        """The PyTorch model with its weights: the glue loaded, each block's weights loaded for its
        call only (streaming), or everything; all back on the meta device on exit."""
        model, blocks = self.comp.source, self.blocks
        in_blocks = {f"{path}.{n}" for path, b in blocks.items() for n, _ in b.named_parameters()}
        materialize(model, self.store, skip=in_blocks.__contains__)
        try:
            with weights_per_call(model, self.store, blocks):
                yield
        finally:
            release(model)


def _export_into(pipeline_dir: Path, bundle: Path, config: ExportConfig, source: str, progress) -> Manifest:
    class_name = read_model_index(pipeline_dir).get("_class_name", "")
    family = families.for_pipeline_class(class_name, pipeline_dir)
    loaded = load_pipeline(pipeline_dir, family.required, family.optional)
    lengths = {} if config.max_sequence_length is None else {"max_sequence_length": config.max_sequence_length}
    spec = family.describe(loaded, max_batch=config.max_batch, **lengths)
    stores = {id(model): loaded.stores[name] for name, model in loaded.components.items() if name in loaded.stores}
    jobs = []
    for comp in spec.components:
        store = stores[id(comp.source)]
        streaming = bool(comp.blocks) and (config.streaming == "on" or (config.streaming == "auto" and 4 * store.numel > STREAM_THRESHOLD))
        precision = "fp32" if comp.name == "vae_decoder" and config.vae_precision == "fp32" else config.precision
        jobs.append(_Job(comp, store, streaming, precision))
    check_disk_space(bundle, jobs)

    (bundle / "onnx").mkdir()
    tokenizers = _write_tokenizers(bundle, spec, pipeline_dir)
    for job in jobs:
        if progress:
            progress(f"{job.comp.name}: trace")
        logger.info("tracing %s (%s)", job.comp.name, "streamed by blocks" if job.streaming else "whole")
        job.traced = trace_component(  # no weight is read: the model stays on the meta device
            job.comp, opset=config.opset, store=job.store, streaming=job.streaming,
            progress=(lambda step, name=job.comp.name: progress(f"{name}: {step}")) if progress else None,
        )
    manifest = Manifest(
        family=spec.family,
        components={job.comp.name: _provisional(job, config.opset) for job in jobs},
        tokenizers=tokenizers,
        latent=spec.latent,
        scheduler=jsonable(spec.scheduler),
        defaults=spec.defaults,
        conditioning=spec.conditioning,
        source=source,
        latentrt_version=__version__,
    )
    ranges = _record_ranges(bundle, manifest, jobs, progress) if any(job.precision != "fp32" for job in jobs) else {}

    components = {}
    for job in jobs:
        components[job.comp.name] = _finish(bundle, job, config, ranges.get(job.comp.name), progress)
        job.traced = None  # the graph proto and glue weights are written: free them
    manifest = replace(manifest, components=components)
    manifest.save(bundle)
    return manifest


def _provisional(job: _Job, opset: int) -> Component:
    """The manifest entry of a traced, not yet written component (enough for a Pipeline to run it)."""
    def specs(values):
        return tuple(
            TensorSpec(v.name, _ONNX_DTYPES.get(v.type.tensor_type.elem_type, "float32"),
                       tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim))
            for v in values
        )

    graph = job.traced.model.graph
    return Component(file="", sha256="", inputs=specs(graph.input), outputs=specs(graph.output), axes=job.comp.axes, opset=opset)


def _finish(bundle: Path, job: _Job, config: ExportConfig, ranges, progress) -> Component:
    """Convert (half precision), write, read back and validate one traced component."""
    from latentrt.export.precision import convert_model

    comp, traced = job.comp, job.traced
    rel = f"onnx/{comp.name}.onnx"
    path = bundle / rel
    report = None
    opset = config.opset
    if job.precision != "fp32":
        if progress:
            progress(f"{comp.name}: {job.precision}")
        opset = 22 if job.precision == "bf16" else config.opset
        traced.model, report = convert_model(
            traced.model, job.precision, ranges, opset=opset if job.precision == "bf16" else None,
            deferred=traced.deferred, what=comp.name,
        )
    if progress:
        progress(f"{comp.name}: write")
    # A streamed component always gets a data file: then reading it back never holds all its weights.
    external = write_component(traced, path, external=True if job.streaming else None)
    if progress:
        progress(f"{comp.name}: validate")
    tolerance = config.tolerance if job.precision == "fp32" else HALF_TOLERANCE[job.precision]
    with job.weights():
        validation = validate_component(comp, path, tolerance=tolerance, simulate=job.precision != "fp32", budget=SEGMENT_BUDGET)
    if job.precision == "fp16" and not external:  # ONNX Runtime CPU runs fp16 graphs (it has no bf16 kernels)
        _check_loads(path)
    inputs, outputs = io_specs(path)
    return Component(
        file=rel,
        sha256=sha256_file(path),
        inputs=inputs,
        outputs=outputs,
        axes=comp.axes,
        precision=job.precision,
        opset=opset,
        external_data=tuple(f"onnx/{name}" for name in external),
        validation=tuple(validation),
        precision_report={} if report is None else report.to_dict(),
        external_sha256=(traced.data_sha256,) if external else (),
        weights={name: recipe.to_dict() for name, recipe in sorted(traced.recipes.items())},
    )


def _write_tokenizers(bundle: Path, spec, pipeline_dir: Path) -> dict[str, TokenizerSpec]:
    tokenizers = {}
    for folder, (tok, max_length) in spec.tokenizers.items():
        if tok.pad_token_id is None:
            raise InputError(f"tokenizer {folder!r} in {pipeline_dir} has no pad token; set pad_token in its tokenizer_config.json")
        (bundle / folder).mkdir()
        tok.backend_tokenizer.save(str(bundle / folder / "tokenizer.json"))
        tokenizers[folder] = TokenizerSpec(file=f"{folder}/tokenizer.json", max_length=max_length, pad_id=tok.pad_token_id)
    return tokenizers


def check_disk_space(bundle: Path, jobs) -> None:
    """Refuse to start when the bundle's weights (counted from the checkpoints) do not fit on the disk.

    Raises:
        InputError: not enough free space, with the numbers.
    """
    need = sum(job.store.numel * (4 if job.precision == "fp32" else 2) for job in jobs)
    free = shutil.disk_usage(bundle).free
    if need > free:
        raise InputError(
            f"the bundle needs about {_size(need)} for its weights and {bundle.parent} has {_size(free)} free; "
            "free some space or write the bundle to another disk"
        )


def _size(count: int) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"


def _record_ranges(bundle: Path, manifest: Manifest, jobs, progress) -> dict[str, dict[str, float]]:
    """Max |value| of every float tensor of every half component, on real inputs: the fp32 graphs
    (not written) generate RANGE_PROMPTS for two steps, each component run segment by segment with
    its weights read from the checkpoint."""
    from latentrt.export.segments import SegmentedModel, update_range
    from latentrt.runtime.pipeline import Pipeline

    runners = {job.comp.name: SegmentedModel(job.traced.model, job.traced.value, budget=SEGMENT_BUDGET) for job in jobs}
    ranges: dict[str, dict[str, float]] = {job.comp.name: {} for job in jobs}
    wanted = {job.comp.name for job in jobs if job.precision != "fp32"}

    def engine(name: str, comp: Component):
        def call(feeds):
            for key, value in feeds.items():
                update_range(ranges[name], key, value)
            values = runners[name].run([s.name for s in comp.outputs], feeds, ranges=ranges[name] if name in wanted else None)
            return dict(zip([s.name for s in comp.outputs], values))

        return call

    if progress:
        progress("ranges")
    pipe = Pipeline(bundle, manifest, {name: engine(name, comp) for name, comp in manifest.components.items()})
    d = manifest.defaults
    size = dict(height=min(d.height, RANGE_SIZE), width=min(d.width, RANGE_SIZE))
    pipe(list(RANGE_PROMPTS), num_inference_steps=2, seed=0, **size)  # one pass over the weights per step
    return ranges


def _check_loads(path: Path) -> None:
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types
        raise ExportError(f"the converted model {path.name} does not load in ONNX Runtime: {err}") from err

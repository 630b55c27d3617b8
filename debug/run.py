"""`debug_bundle`: compare one component of a bundle with its reference, layer by layer.

1. Resolve the two graphs (`resolve_reference`): the candidate is the bundle's component; the
   reference is `--reference`'s, or the fp32 graph it came from (a calibrated bundle records its
   source bundle), or for fp16 / bf16 the candidate's own graph computed in float32.
2. Record the component's real inputs from a generation with the candidate bundle's pipeline.
3. Mark every comparable tensor as an output of both graphs and run them through Polygraphy's
   runners and comparator (compare.py).
4. Report every layer in topological order, the first over tolerance and the first with NaN / Inf,
   and a suggestion (report.py).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from latentrt.bundle.manifest import Manifest, load_manifest, sha256_file
from latentrt.debug import graphs
from latentrt.debug.compare import compare, onnxruntime_runner, quiet_polygraphy, tensorrt_runner
from latentrt.debug.record import DEFAULT_PROMPT, check_component, record_inputs
from latentrt.debug.report import DebugReport, LayerReport, first, suggest
from latentrt.errors import BundleError, InputError

logger = logging.getLogger(__name__)

Backend = Literal["onnxruntime", "tensorrt"]
BACKENDS = ("onnxruntime", "tensorrt")
#: Default tolerance on each layer's relative L2 error, by the candidate's precision. Half precision
#: matches export's validation of the final outputs; int8 / fp8 layers sit at ~1e-2 on the demo model.
DEFAULT_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 3e-2, "int8": 0.1, "fp8": 0.1}


@dataclass(frozen=True)
class DebugConfig:
    """What to compare and on which inputs. Round-trips through JSON (`dataclasses.asdict`).

    Attributes:
        component: the bundle component (None: the family's denoiser).
        reference: a reference bundle (None: the fp32 graph the candidate came from; see `resolve_reference`).
        backend: runs the candidate: "onnxruntime" (CPU) or "tensorrt" (Polygraphy's TensorRT runner,
            needs a GPU); the reference always runs on ONNX Runtime CPU.
        prompt, steps, guidance_scale, seed: the generation whose component inputs are recorded
            (None: the manifest's defaults).
        calls: 0-based indices of the component's calls to compare (the denoiser is called once per
            step); None compares every call.
        tolerance: relative L2 error above which a layer counts as over tolerance (None: by precision,
            `DEFAULT_TOLERANCE`).
    """

    component: str | None = None
    reference: str | None = None
    backend: Backend = "onnxruntime"
    prompt: str = DEFAULT_PROMPT
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    calls: tuple[int, ...] | None = None
    tolerance: float | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.reference is not None:
            object.__setattr__(self, "reference", os.fspath(self.reference))
        if self.steps is not None and not (isinstance(self.steps, int) and self.steps >= 1):
            raise InputError(f"steps must be >= 1, got {self.steps!r}")
        if self.calls is not None:
            object.__setattr__(self, "calls", tuple(int(c) for c in self.calls))
            if not self.calls or min(self.calls) < 0:
                raise InputError(f"calls must be non-negative call indices, got {self.calls!r}; leave it unset to compare every call")
        if self.tolerance is not None and not (self.tolerance > 0):
            raise InputError(f"tolerance must be > 0, got {self.tolerance!r}")


@dataclass(frozen=True)
class Side:
    """One graph of the comparison: its ONNX file, its precision, a description, and whether it is
    the candidate's graph computed in float32 (`upcast`)."""

    path: Path
    precision: str
    label: str
    upcast: bool = False


def resolve_reference(bundle: Path, manifest: Manifest, component: str, config: DebugConfig) -> Side:
    """The reference graph for `component` of `bundle`.

    - `config.reference`: that bundle's component.
    - int8 / fp8: the fp32 bundle it was calibrated from (recorded by `latentrt calibrate`), if it is
      still there and unchanged.
    - fp16 / bf16: the candidate's graph computed in float32 over its own weights (export does not
      keep the fp32 graph); pass `reference` to include the rounding of the weights.
    - fp32 on TensorRT: the same ONNX on ONNX Runtime.
    """
    comp = manifest.components[component]
    if config.reference is not None:
        ref_bundle = Path(config.reference)
        ref_manifest = load_manifest(ref_bundle)
        check_component(ref_manifest, component, ref_bundle)
        ref = ref_manifest.components[component]
        return Side(ref_bundle / ref.file, ref.precision, f"{ref_bundle}:{component} ({ref.precision}, onnxruntime)")
    if comp.precision in ("int8", "fp8"):
        record = manifest.extra.get("quantization", {}).get(component, {})
        source = record.get("source_bundle")
        hint = f"pass --reference with the fp32 bundle {bundle} was calibrated from"
        if source is None:
            raise InputError(f"{bundle}'s quantization record does not say which bundle it was calibrated from; {hint}")
        source = Path(source)
        try:
            ref = load_manifest(source).components[component]
        except (BundleError, InputError, KeyError, OSError) as err:
            raise InputError(f"{bundle} was calibrated from {source}, which is no longer a bundle with {component!r} ({err}); {hint}") from err
        if sha256_file(source / ref.file) != record.get("source_sha256"):
            raise InputError(f"{source}'s {component} has changed since {bundle} was calibrated from it; {hint}")
        return Side(source / ref.file, ref.precision, f"{source}:{component} ({ref.precision}, onnxruntime)")
    if comp.precision in ("fp16", "bf16"):
        return Side(bundle / comp.file, comp.precision, f"{bundle}:{component} ({comp.precision} graph computed in fp32, onnxruntime)", upcast=True)
    if config.backend == "tensorrt":
        return Side(bundle / comp.file, comp.precision, f"{bundle}:{component} ({comp.precision}, onnxruntime)")
    raise InputError(
        f"{bundle}'s {component} is fp32: on onnxruntime it would be compared with itself; pass --reference "
        "with another bundle, or --backend tensorrt to compare the TensorRT engine with ONNX Runtime"
    )


def debug_bundle(
    bundle: str | os.PathLike,
    config: DebugConfig = DebugConfig(),
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> DebugReport:
    """Compare every layer of one component of `bundle` with its reference on real inputs.

    Args:
        bundle: the candidate bundle (fp16 / bf16 from `latentrt export`, int8 / fp8 from
            `latentrt calibrate`, or any bundle on `backend="tensorrt"`).
        progress: called as `progress(stage, done, total)` for "recording" and "comparing".

    Returns:
        a `DebugReport` (`report.to_dict()` is the JSON; `plot_report` draws it).

    Example:
        >>> report = debug_bundle("out/demo-int8", DebugConfig(steps=4))  # doctest: +SKIP
        >>> report.first_over_tolerance, report.suggestion.command  # doctest: +SKIP
    """
    from latentrt.runtime.families import FAMILIES

    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    component = config.component or FAMILIES[manifest.family].denoiser
    check_component(manifest, component, bundle)
    comp = manifest.components[component]
    reference = resolve_reference(bundle, manifest, component, config)
    tolerance = config.tolerance or DEFAULT_TOLERANCE.get(comp.precision, 1e-2)

    if progress:
        progress("recording", 0, 1)
    feeds = record_inputs(
        bundle, component, prompt=config.prompt, steps=config.steps, guidance_scale=config.guidance_scale, seed=config.seed, calls=config.calls
    )
    if progress:
        progress("recording", 1, 1)

    with tempfile.TemporaryDirectory(prefix="latentrt-debug-") as tmp:
        scratch = Path(tmp)
        candidate_model = graphs.load(bundle / comp.file)
        if reference.upcast:
            reference_path = graphs.save(graphs.upcast_model(graphs.load(reference.path)), scratch / "reference.onnx")
            reference_precision = "fp32"
        else:
            reference_path, reference_precision = reference.path, reference.precision
        reference_model = graphs.load(reference_path, weights=False)

        record = manifest.extra.get("quantization", {}).get(component)
        rescaled, complete = graphs.rescaled_by_smoothquant(record)
        if not complete:
            logger.warning(
                "%s was calibrated before latentrt recorded SmoothQuant's fold paths: tensors upstream of the smoothed "
                "ones may show errors that are only rescaling; recalibrate for an exact report", bundle,
            )
        layers = graphs.comparable_tensors(reference_model, candidate_model, skip=rescaled)
        if not layers:
            raise InputError(f"{bundle}'s {component} and its reference {reference.label} share no tensor names to compare")
        tensors = [t for layer in layers for t in layer.tensors]
        quantized = graphs.quantized_layers(candidate_model) if comp.precision in ("int8", "fp8") else set()
        sources = _sources(reference_model, layers)
        del candidate_model

        with quiet_polygraphy():
            reference_runner = onnxruntime_runner(graphs.runnable_model(reference_path, reference_precision, scratch, "reference"), tensors, scratch, "reference")
            if config.backend == "tensorrt":
                candidate_runner = tensorrt_runner(bundle / comp.file, tensors, feeds, "candidate")
            else:
                candidate_runner = onnxruntime_runner(graphs.runnable_model(bundle / comp.file, comp.precision, scratch, "candidate"), tensors, scratch, "candidate")
        report_progress = (lambda done, total: progress("comparing", done, total)) if progress else None
        stats, outputs_match = compare(
            candidate_runner, reference_runner, feeds, tensors, outputs=[o.name for o in comp.outputs], tolerance=tolerance, progress=report_progress
        )

    reports = []
    for layer in layers:
        measured = [stats[t] for t in layer.tensors if t in stats]
        if not measured:
            continue
        diff_sq, ref_sq = sum(s.diff_sq for s in measured), sum(s.ref_sq for s in measured)
        rel = math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else (0.0 if diff_sq == 0 else math.inf)
        low, high = min(s.low for s in measured), max(s.high for s in measured)
        reports.append(
            LayerReport(
                name=layer.name,
                op=layer.op,
                max_abs=_finite(math.nan if any(math.isnan(s.max_abs) for s in measured) else max(s.max_abs for s in measured)),
                rel_l2=_finite(rel),
                nan=sum(s.nan for s in measured),
                inf=sum(s.inf for s in measured),
                min=_finite(low),
                max=_finite(high),
                reference_absmax=_finite(max(s.ref_absmax for s in measured)),
                quantized=layer.name in quantized,
            )
        )
    first_nonfinite = first(reports, lambda layer: layer.nonfinite)
    first_over = first(reports, lambda layer: layer.over(tolerance))
    backend_label = "tensorrt" if config.backend == "tensorrt" else "onnxruntime"
    calibrate = _calibrate_command(record) if record else None
    return DebugReport(
        component=component,
        reference=reference.label,
        candidate=f"{bundle}:{component} ({comp.precision}, {backend_label})",
        backend=config.backend,
        precision=comp.precision,
        tolerance=tolerance,
        calls=len(feeds),
        layers=tuple(reports),
        first_over_tolerance=first_over.name if first_over else None,
        first_nonfinite=first_nonfinite.name if first_nonfinite else None,
        suggestion=suggest(
            reports, precision=comp.precision, tolerance=tolerance, first_over=first_over, first_nonfinite=first_nonfinite,
            sources=sources, calibrate_command=calibrate,
        ),
        not_compared={t: "rescaled per channel by SmoothQuant (not an error)" for t in sorted(rescaled)},
        outputs_match=outputs_match,
    )


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _sources(reference, layers: list[graphs.Layer]) -> dict[str, list[str]]:
    """For each layer, the nearest compared layers upstream of its inputs (walking through tensors
    that are not compared, such as those SmoothQuant rescaled)."""
    producer = {o: n for n in reference.graph.node for o in n.output}
    owner = {t: layer.name for layer in layers for t in layer.tensors}
    found: dict[str, list[str]] = {}
    for layer in layers:
        seen, stack, hits = set(), list(layer.inputs), []
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in owner:
                hits.append(owner[t])
            elif t in producer and len(seen) < 64:
                stack.extend(i for i in producer[t].input if i)
        found[layer.name] = list(dict.fromkeys(hits))
    return found


def _calibrate_command(record: dict) -> str:
    """The `latentrt calibrate` command line that made a quantized bundle, from its record."""
    p = record.get("parameters", {})
    parts = [f"latentrt calibrate {record.get('source_bundle', 'FP32_BUNDLE')} -o OUT --precision {record.get('precision', 'int8')}"]
    parts.append(f"--method {record.get('method', 'percentile')}")
    if p.get("percentile") is not None:
        parts.append(f"--percentile {p['percentile']:g}")
    if p.get("smoothquant_alpha") is None:
        parts.append("--no-smoothquant")
    else:
        parts.append(f"--smoothquant-alpha {p['smoothquant_alpha']:g}")
    if p.get("steps") is not None:
        parts.append(f"--steps {p['steps']}")
    if p.get("guidance_scale") is not None:
        parts.append(f"--guidance {p['guidance_scale']:g}")
    parts.append(f"--num-prompts {record.get('num_prompts', 32)}")
    if p.get("seed"):
        parts.append(f"--seed {p['seed']}")
    if not _default_prompts_used(record):
        parts.append("--prompts PROMPTS_FILE")  # the record keeps the prompts' sha256, not their file
    parts += [f"--exclude '{e}'" for e in p.get("exclude", [])]
    return " ".join(parts)


def _default_prompts_used(record: dict) -> bool:
    """Whether a calibration ran on `calibrate`'s default prompt list (its sha256 matches)."""
    from latentrt.calibration.prompts import default_prompts, prompts_sha256, select_prompts

    try:
        manifest = load_manifest(record["source_bundle"], verify=False)
    except (BundleError, InputError, KeyError, OSError):
        return False
    count = int(record.get("num_prompts", 32))
    prompts = select_prompts(default_prompts(manifest, count, seed=int(record.get("parameters", {}).get("seed", 0))), count)
    return prompts_sha256(prompts) == record.get("prompts_sha256")

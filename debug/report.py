"""The debug report: per-layer errors in topological order, where things break, what to do about it.

JSON schema (version 1; keys are only ever added)::

    {"schema_version": 1, "component", "reference", "candidate", "backend", "precision",
     "tolerance", "calls",
     "layers": [{"name", "op", "max_abs", "rel_l2", "nan", "inf", "min", "max",
                 "reference_absmax", "quantized"}],
     "first_over_tolerance", "first_nonfinite",
     "suggestion": {"text", "keep_fp32", "exclude", "command"},
     "not_compared": {"tensor": "why"}, "outputs_match"}

`max_abs` / `rel_l2` are null where they are not finite (the `nan` / `inf` counts say why); `min` /
`max` are the candidate's finite value range (null when nothing was finite); `first_*` are layer
names or null; `outputs_match` is Polygraphy's element-wise verdict on the component's own outputs
(atol = rtol = tolerance).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1
#: Largest finite value of each half dtype.
HALF_MAX = {"fp16": 65504.0, "bf16": 3.3895313892515355e38}
#: Export keeps a node fp32 when a range exceeds this fraction of the half maximum (export/precision.py).
ISLAND_MARGIN = 0.5


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass(frozen=True)
class LayerReport:
    """One compared node. `quantized`: the candidate runs it as an int8 / fp8 layer."""

    name: str
    op: str
    max_abs: float | None
    rel_l2: float | None
    nan: int
    inf: int
    min: float | None
    max: float | None
    reference_absmax: float | None
    quantized: bool = False

    @property
    def nonfinite(self) -> bool:
        return self.nan > 0 or self.inf > 0

    def over(self, tolerance: float) -> bool:
        return self.nonfinite or self.rel_l2 is None or self.rel_l2 > tolerance

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "op": self.op, "max_abs": self.max_abs, "rel_l2": self.rel_l2, "nan": self.nan,
            "inf": self.inf, "min": self.min, "max": self.max, "reference_absmax": self.reference_absmax,
            "quantized": self.quantized,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerReport:
        return cls(**{k: d.get(k) for k in ("name", "op", "max_abs", "rel_l2", "nan", "inf", "min", "max", "reference_absmax")},
                   quantized=bool(d.get("quantized", False)))


@dataclass(frozen=True)
class Suggestion:
    """What to change. `keep_fp32`: nodes for export to keep in float32; `exclude`: regular
    expressions for `latentrt calibrate --exclude`; `command`: the command line, spelled out."""

    text: str
    keep_fp32: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    command: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "keep_fp32": list(self.keep_fp32), "exclude": list(self.exclude), "command": self.command}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Suggestion:
        return cls(text=d["text"], keep_fp32=tuple(d.get("keep_fp32", ())), exclude=tuple(d.get("exclude", ())), command=d.get("command"))


@dataclass(frozen=True)
class DebugReport:
    """Where a candidate graph departs from its reference, layer by layer. Round-trips through JSON.

    Attributes:
        component: the bundle component compared (e.g. "transformer").
        reference, candidate: what ran, in words (bundle, component, precision, backend).
        backend: the candidate's backend ("onnxruntime" or "tensorrt"); the reference runs on ONNX Runtime.
        precision: the candidate component's precision.
        tolerance: the relative L2 error above which a layer counts as over tolerance.
        calls: how many recorded calls of the component were compared.
        layers: every compared node, in the reference graph's topological order.
        first_over_tolerance, first_nonfinite: layer names, or None.
        suggestion: what to do.
        not_compared: tensors left out, and why (e.g. rescaled by SmoothQuant).
        outputs_match: Polygraphy's verdict on the component's outputs (element-wise, atol = rtol = tolerance).
    """

    component: str
    reference: str
    candidate: str
    backend: str
    precision: str
    tolerance: float
    calls: int
    layers: tuple[LayerReport, ...]
    first_over_tolerance: str | None
    first_nonfinite: str | None
    suggestion: Suggestion
    not_compared: dict[str, str] = field(default_factory=dict)
    outputs_match: bool | None = None

    def layer(self, name: str) -> LayerReport:
        return next(layer for layer in self.layers if layer.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "component": self.component,
            "reference": self.reference,
            "candidate": self.candidate,
            "backend": self.backend,
            "precision": self.precision,
            "tolerance": self.tolerance,
            "calls": self.calls,
            "layers": [layer.to_dict() for layer in self.layers],
            "first_over_tolerance": self.first_over_tolerance,
            "first_nonfinite": self.first_nonfinite,
            "suggestion": self.suggestion.to_dict(),
            "not_compared": dict(self.not_compared),
            "outputs_match": self.outputs_match,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DebugReport:
        return cls(
            component=d["component"],
            reference=d["reference"],
            candidate=d["candidate"],
            backend=d["backend"],
            precision=d["precision"],
            tolerance=float(d["tolerance"]),
            calls=int(d["calls"]),
            layers=tuple(LayerReport.from_dict(layer) for layer in d["layers"]),
            first_over_tolerance=d.get("first_over_tolerance"),
            first_nonfinite=d.get("first_nonfinite"),
            suggestion=Suggestion.from_dict(d["suggestion"]),
            not_compared=dict(d.get("not_compared", {})),
            outputs_match=d.get("outputs_match"),
        )


def exclude_pattern(node: str) -> str:
    """A regular expression for `--exclude` that matches exactly `node` (re.search on node names)."""
    return f"^{re.escape(node)}$"


def suggest(
    layers: Sequence[LayerReport],
    *,
    precision: str,
    tolerance: float,
    first_over: LayerReport | None,
    first_nonfinite: LayerReport | None,
    sources: Mapping[str, Sequence[str]],
    calibrate_command: str | None = None,
) -> Suggestion:
    """What to do, from the layers (topological order) and each layer's compared input layers (`sources`).

    - Non-finite values in a half graph: the layers whose reference range passes the island margin of
      the half dtype (what export's range recording keeps fp32), else the layers where NaN / Inf start.
    - A quantized graph over tolerance: the quantized layers that add the most error, each its own
      `--exclude` pattern, and the calibrate command with them.
    - Anything else over tolerance: the first layer over it, to keep in high precision.
    """
    by_name = {layer.name: layer for layer in layers}
    if first_over is None and first_nonfinite is None:
        return Suggestion(text=f"every layer is within tolerance (relative L2 <= {tolerance:g}); nothing to change")

    if first_nonfinite is not None and precision in HALF_MAX:
        limit = ISLAND_MARGIN * HALF_MAX[precision]
        keep = [layer.name for layer in layers if layer.reference_absmax is not None and layer.reference_absmax > limit]
        starts = [
            layer.name for layer in layers
            if layer.nonfinite and not any(by_name[s].nonfinite for s in sources.get(layer.name, ()) if s in by_name)
        ]
        keep = list(dict.fromkeys(keep + starts))
        peak = first_nonfinite.reference_absmax or 0.0
        reason = (
            f"its reference output reaches |x| = {peak:.4g}, beyond {precision}'s largest value {HALF_MAX[precision]:g}"
            if peak > limit else "its inputs or arithmetic overflow in half precision"
        )
        return Suggestion(
            text=(
                f"{first_nonfinite.op} {first_nonfinite.name!r} is the first layer to produce NaN/Inf in {precision}: {reason}. Keep "
                f"{len(keep)} node(s) in fp32: `latentrt export SOURCE -o BUNDLE --precision {precision}` records real "
                "ranges and keeps such nodes in fp32 islands by itself (this graph was converted without them); "
                "in Python, convert_precision(..., ranges=record_ranges(...)) does the same. bf16 holds these values too."
            ),
            keep_fp32=tuple(keep),
            command=f"latentrt export SOURCE -o BUNDLE --precision {precision}",
        )

    if any(layer.quantized for layer in layers):
        culprits = _culprits(layers, tolerance, sources)
        if culprits:
            patterns = tuple(exclude_pattern(name) for name in culprits)
            flags = " ".join(f"--exclude '{p}'" for p in patterns)
            command = f"{calibrate_command} {flags}" if calibrate_command else f"latentrt calibrate FP32_BUNDLE -o OUT --precision int8 {flags}"
            worst = by_name[culprits[0]]
            return Suggestion(
                text=(
                    f"quantized {worst.op} {worst.name!r} adds the most error (relative L2 {worst.rel_l2:.3g} at its output); "
                    f"keep {'it' if len(culprits) == 1 else f'it and {len(culprits) - 1} more'} in high precision: "
                    f"recalibrate with {flags}"
                ),
                exclude=patterns,
                command=command,
            )

    layer = first_nonfinite or first_over
    what = "NaN/Inf" if layer.nonfinite else f"relative L2 {layer.rel_l2:.3g} > {tolerance:g}"
    return Suggestion(
        text=f"{layer.op} {layer.name!r} is where the candidate first departs from the reference ({what}); keep it in high precision",
        keep_fp32=(layer.name,),
    )


def _culprits(layers: Sequence[LayerReport], tolerance: float, sources: Mapping[str, Sequence[str]], *, most: int = 3) -> list[str]:
    """The quantized layers over tolerance ranked by the error they add: the ratio of their output's
    relative L2 to the largest relative L2 among the compared layers feeding them (1 when none is);
    those within a factor of 2 of the worst, at most `most`."""
    by_name = {layer.name: layer for layer in layers}
    gains = {}
    for layer in layers:
        if not layer.quantized or not layer.over(tolerance) or layer.rel_l2 is None:
            continue
        upstream = [by_name[s].rel_l2 for s in sources.get(layer.name, ()) if s in by_name and by_name[s].rel_l2 is not None]
        base = max(upstream, default=0.0)
        gains[layer.name] = layer.rel_l2 / max(base, tolerance)
    ranked = sorted(gains, key=gains.get, reverse=True)
    return [name for name in ranked if gains[name] >= gains[ranked[0]] / 2][:most] if ranked else []


def first(layers: Sequence[LayerReport], predicate) -> LayerReport | None:
    return next((layer for layer in layers if predicate(layer)), None)

"""Error against depth, as a PNG: people would rather look than read.

Top: each layer's relative L2 error (log scale) against its position in the topological order, the
tolerance as a dashed line, quantized layers as squares, layers identical to the reference as grey
dashes at the bottom edge, layers with NaN / Inf as red crosses at the top edge, and the first layer
over tolerance and the first non-finite one named. Bottom: each layer's
largest |value| in the reference, with the half dtype's largest value where the candidate is
fp16 / bf16 (an overflow shows as a point above that line).
"""

from __future__ import annotations

import os
from pathlib import Path

from latentrt.debug.report import HALF_MAX, DebugReport
from latentrt.errors import InputError


def plot_report(report: DebugReport, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Draw `report` to a PNG at `path` (needs matplotlib); returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise InputError("the debug plot needs matplotlib: pip install 'latentrt[debug]' (or pip install matplotlib)") from err

    layers = report.layers
    depth = list(range(len(layers)))
    finite = [(i, layer) for i, layer in zip(depth, layers) if layer.rel_l2 is not None and not layer.nonfinite]
    floor = min((layer.rel_l2 for _, layer in finite if layer.rel_l2 > 0), default=report.tolerance) / 10
    top = max([report.tolerance * 10] + [layer.rel_l2 for _, layer in finite]) * 3

    fig, (ax, ax_range) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    exact = [i for i, layer in finite if layer.rel_l2 == 0]
    if exact:
        ax.scatter(exact, [floor] * len(exact), s=8, marker="_", color="grey", label="identical to the reference")
    for marker, quantized, label in (("o", False, "layer"), ("s", True, "quantized layer")):
        points = [(i, layer.rel_l2) for i, layer in finite if layer.quantized == quantized and layer.rel_l2 > 0]
        if points:
            ax.scatter(*zip(*points), s=10 if not quantized else 18, marker=marker, label=label, alpha=0.75)
    bad = [i for i, layer in zip(depth, layers) if layer.nonfinite or layer.rel_l2 is None]
    if bad:
        ax.scatter(bad, [top / 1.5] * len(bad), marker="x", color="red", s=24, label="NaN / Inf")
    ax.axhline(report.tolerance, color="grey", linestyle="--", linewidth=1, label=f"tolerance {report.tolerance:g}")
    marks = [(report.first_over_tolerance, "darkorange", "first over tolerance"), (report.first_nonfinite, "red", "first NaN/Inf")]
    if report.first_over_tolerance is not None and report.first_over_tolerance == report.first_nonfinite:
        marks = [(report.first_nonfinite, "red", "first over tolerance and first NaN/Inf")]
    for name, colour, what in marks:
        if name is not None:
            i = next(i for i, layer in zip(depth, layers) if layer.name == name)
            ax.axvline(i, color=colour, linewidth=1, alpha=0.6)
            right = i > len(layers) / 2
            ax.annotate(f"{what}: {name}", xy=(i, top / 1.5), xytext=(-4 if right else 4, -14 if colour == "red" else -28),
                        textcoords="offset points", fontsize=7, color=colour, ha="right" if right else "left")
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, top)
    ax.set_xlim(-0.02 * len(layers) - 1, 1.02 * len(layers))
    ax.set_ylabel("relative L2 error vs reference")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or f"{report.component}: {report.candidate}\nvs {report.reference}", fontsize=8)

    ranges = [(i, layer.reference_absmax) for i, layer in zip(depth, layers) if layer.reference_absmax]
    if ranges:
        ax_range.scatter(*zip(*ranges), s=6, color="tab:green")
    if report.precision in HALF_MAX and report.precision == "fp16":
        ax_range.axhline(HALF_MAX["fp16"], color="red", linestyle="--", linewidth=1, label="fp16 max 65504")
        ax_range.legend(fontsize=7, loc="upper left")
    ax_range.set_yscale("log")
    ax_range.set_ylabel("reference max |x|")
    ax_range.set_xlabel(f"layer (topological order, {len(layers)} compared)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

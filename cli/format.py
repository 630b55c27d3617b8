"""Plain-text tables for the CLI."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import click


def echo_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    line = "  ".join("{:<%d}" % w for w in widths)
    click.echo(line.format(*header))
    click.echo(line.format(*("-" * w for w in widths)))
    for r in rows:
        click.echo(line.format(*r))


def timing_rows(timings: dict) -> list[tuple[str, str]]:
    """Per-stage rows (milliseconds) from a PipelineOutput.timings dict."""
    steps = timings["denoising_steps"]
    rows = [("text encoding", f"{timings['text_encoding'] * 1e3:.1f}")]
    if steps:
        rows.append((f"denoising ({len(steps)} steps)", f"{sum(steps) * 1e3:.1f}"))
        rows.append(("  per step (median)", f"{sorted(steps)[len(steps) // 2] * 1e3:.1f}"))
    rows.append(("VAE decode", f"{timings['vae_decode'] * 1e3:.1f}"))
    rows.append(("total", f"{timings['total'] * 1e3:.1f}"))
    return rows

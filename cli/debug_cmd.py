"""`latentrt debug BUNDLE`: find the layer where a component's output drifts from its reference."""

from __future__ import annotations

import json

import click

from latentrt.cli.format import echo_table


@click.command("debug")
@click.argument("bundle", type=click.Path())
@click.option("--component", default=None, help="The component to compare (default: the denoiser).")
@click.option("--reference", type=click.Path(), default=None,
              help="Reference bundle (default: the fp32 bundle a calibrated bundle came from; for fp16/bf16 the graph computed in fp32).")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="Runs the candidate (the reference runs on ONNX Runtime CPU); tensorrt needs a GPU.")
@click.option("--steps", type=int, default=None, help="Denoising steps of the recorded generation (default: the bundle's).")
@click.option("--call", "calls", type=int, multiple=True, metavar="I",
              help="Compare only the component's I-th call (0-based; the denoiser is called once per step). Repeatable; default: every call.")
@click.option("-p", "--prompt", default=None, help="Prompt of the recorded generation.")
@click.option("--guidance", type=float, default=None, help="Guidance scale of the recorded generation (default: the bundle's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tolerance", type=float, default=None, help="Relative L2 error per layer (default by precision: fp16 1e-2, bf16 3e-2, int8/fp8 0.1).")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Write the report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(), default=None, help="Draw error against depth to a PNG (needs matplotlib).")
@click.option("--top", type=int, default=10, show_default=True, help="Layers with the largest error to list.")
def command(bundle, component, reference, backend, steps, calls, prompt, guidance, seed, tolerance, json_path, plot_path, top) -> None:
    """Run one component of BUNDLE and its reference with every intermediate tensor marked as an output
    (Polygraphy's runners), on inputs recorded from a real generation, and report each layer's error
    in topological order: the first layer over tolerance, where NaN/Inf first appear, what to change."""
    from tqdm import tqdm

    from latentrt.debug import DebugConfig, debug_bundle
    from latentrt.debug.record import DEFAULT_PROMPT

    config = DebugConfig(
        component=component, reference=reference, backend=backend, prompt=prompt or DEFAULT_PROMPT, steps=steps,
        guidance_scale=guidance, seed=seed, calls=tuple(calls) or None, tolerance=tolerance,
    )
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=stage, unit="call", leave=False))
        bar.total = total
        bar.update(done - bar.n)

    try:
        report = debug_bundle(bundle, config, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()

    click.echo(f"candidate: {report.candidate}\nreference: {report.reference}")
    click.echo(f"{len(report.layers)} layers compared over {report.calls} calls; tolerance: relative L2 {report.tolerance:g}")
    def fmt(x):
        return "-" if x is None else f"{x:.3g}"

    worst = sorted(report.layers, key=lambda layer: -1.0 if layer.rel_l2 is None and not layer.nonfinite else (float("inf") if layer.nonfinite else layer.rel_l2), reverse=True)
    order = {layer.name: i for i, layer in enumerate(report.layers)}
    rows = [
        (order[layer.name], layer.op + (" (q)" if layer.quantized else ""), layer.name, fmt(layer.rel_l2), fmt(layer.max_abs), layer.nan, layer.inf,
         f"[{fmt(layer.min)}, {fmt(layer.max)}]")
        for layer in worst[:top]
    ]
    echo_table(("depth", "op", "layer", "rel L2", "max abs", "NaN", "Inf", "range"), rows)
    click.echo(f"first over tolerance: {report.first_over_tolerance or '-'}")
    click.echo(f"first NaN/Inf:        {report.first_nonfinite or '-'}")
    click.echo(f"component outputs within tolerance (Polygraphy): {'yes' if report.outputs_match else 'no'}")
    click.echo(f"suggestion: {report.suggestion.text}")
    if report.suggestion.command:
        click.echo(f"  {report.suggestion.command}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
        click.echo(f"wrote {json_path}")
    if plot_path:
        from latentrt.debug import plot_report

        plot_report(report, plot_path)
        click.echo(f"wrote {plot_path}")

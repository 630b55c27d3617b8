"""`latentrt bench SOURCE`: diffusers eager vs latentrt backends, alternated in one run."""

from __future__ import annotations

from pathlib import Path

import click

from latentrt.cli.params import FINITE_FLOAT, NON_NEGATIVE, POSITIVE, check_file_output, save_json


@click.command("bench")
@click.argument("source")
@click.option("--bundle", type=click.Path(), default=None, help="The latentrt bundle of SOURCE (exported if omitted).")
@click.option("--int8-bundle", type=click.Path(), default=None, help="A bundle from `latentrt calibrate` for onnxruntime-int8 / openvino-int8.")
@click.option(
    "--backends",
    default=None,
    help="Comma-separated: torch, torch-bf16, onnxruntime, onnxruntime-int8, openvino, openvino-int8, tensorrt. "
    "Default: torch, torch-bf16 (CPUs with bf16), onnxruntime, openvino (when installed), and the int8 ones with --int8-bundle.",
)
@click.option("--steps", type=POSITIVE, default=8, show_default=True)
@click.option("--size", default=None, help="HxW (default: the bundle's).")
@click.option("--batch", type=POSITIVE, default=1, show_default=True, help="Images per call.")
@click.option("--guidance", type=FINITE_FLOAT, default=None, help="Guidance scale (default: the bundle's).")
@click.option("--prompt", default="a large red circle on the left", show_default=True)
@click.option("--runs", type=POSITIVE, default=3, show_default=True)
@click.option("--warmup", type=NON_NEGATIVE, default=1, show_default=True)
@click.option("--threads", type=NON_NEGATIVE, default=0, show_default=True, help="Intra-op threads per backend (0: all cores).")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Write the full report as JSON.")
def command(source, bundle, int8_bundle, backends, steps, size, batch, guidance, prompt, runs, warmup, threads, json_path) -> None:
    """Benchmark SOURCE: the same prompt, size, steps, guidance and initial latents through each backend.

    Each backend runs in its own process (peak RSS is its own); repetitions alternate between
    backends. Prints the CPU and its matrix instruction set, then a markdown table: per-stage
    median/min/max, speedups against diffusers in float32 and against the fastest torch
    configuration (bf16 where the CPU has it), the largest pixel difference against diffusers, and
    the fraction of the FLOP floor reached (at the fastest matrix rate measured for the backend's precisions).
    """
    from latentrt.bench import BenchConfig, run_bench
    from latentrt.errors import InputError

    if json_path:
        json_path = check_file_output(Path(json_path), inputs={"source": source, "bundle": bundle, "int8 bundle": int8_bundle})
    height = width = None
    if size:
        try:
            height, width = (int(v) for v in size.lower().split("x"))
        except ValueError as err:
            raise InputError(f"--size {size!r} must be HxW, for example 256x256") from err
    config = BenchConfig(
        source=source,
        bundle=bundle,
        int8_bundle=int8_bundle,
        backends=tuple(b.strip() for b in (backends or "").split(",") if b.strip()),
        prompt=prompt,
        steps=steps,
        height=height,
        width=width,
        batch=batch,
        guidance_scale=guidance,
        runs=runs,
        warmup=warmup,
        threads=threads,
    )
    report = run_bench(config, progress=lambda msg: click.echo(msg, err=True))
    click.echo(report.to_markdown())
    if json_path:
        save_json(report.to_dict(), json_path)
        click.echo(f"wrote {json_path}")

"""`latentrt calibrate BUNDLE -o OUT_BUNDLE --precision int8|fp8`."""

from __future__ import annotations

import click

from latentrt.cli.format import echo_table
from latentrt.cli.params import FINITE_FLOAT, POSITIVE, SEED


@click.command("calibrate")
@click.argument("bundle", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Quantized bundle directory to create.")
@click.option("--precision", type=click.Choice(["int8", "fp8"]), required=True, help="int8 (W8A8) or fp8 (E4M3, opset 19).")
@click.option("--prompts", "prompts_file", type=click.Path(), default=None, help="Calibration prompts, one per line (default: built-in list).")
@click.option("--num-prompts", type=POSITIVE, default=32, show_default=True, help="Use the first N prompts.")
@click.option("--steps", type=POSITIVE, default=None, help="Denoising steps per prompt (default: the bundle's).")
@click.option("--method", type=click.Choice(["percentile", "entropy", "minmax"]), default="percentile", show_default=True,
              help="How activation ranges are chosen from the histograms.")
@click.option("--percentile", type=float, default=99.99, show_default=True, help="For --method percentile, in (0, 100].")
@click.option("--smoothquant-alpha", type=float, default=0.8, show_default=True, help="SmoothQuant strength in [0, 1].")
@click.option("--no-smoothquant", is_flag=True, help="Do not smooth the linear layers' inputs.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Regex of node names to keep in high precision (repeatable).")
@click.option("--guidance", type=FINITE_FLOAT, default=None, help="Guidance scale of the calibration runs (default: the bundle's).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty output directory.")
def command(bundle, output, precision, prompts_file, num_prompts, steps, method, percentile, smoothquant_alpha, no_smoothquant,
            exclude, guidance, seed, overwrite) -> None:
    """Calibrate BUNDLE's denoiser over whole denoising trajectories and write a Q/DQ-quantized bundle.

    The new bundle's denoiser is an explicit-quantization ONNX graph for TensorRT (build it with
    `latentrt build`); the other components are linked unchanged. A TensorRT calibration cache is
    written next to the quantized ONNX for legacy implicit-int8 builds.
    """
    from tqdm import tqdm

    from latentrt.calibration.quantize import QuantizeConfig, quantize_bundle

    config = QuantizeConfig(
        precision=precision,
        method=method,
        percentile=percentile,
        smoothquant_alpha=None if no_smoothquant else smoothquant_alpha,
        exclude=tuple(exclude),
        prompts_file=prompts_file,
        num_prompts=num_prompts,
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
        overwrite=overwrite,
    )
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=stage, unit="prompt", leave=False))
        bar.update(done - bar.n)

    try:
        manifest = quantize_bundle(bundle, output, config, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
    for name, record in manifest.extra["quantization"].items():
        smooth = record["smoothquant"]
        echo_table(
            ("component", "precision", "method", "quantized", "excluded", "smoothed", "prompts"),
            [(name, record["precision"], record["method"], record["quantized_nodes"], len(record["excluded_layers"]),
              "-" if smooth is None else f"{len(smooth['smoothed'])}/{len(smooth['smoothed']) + len(smooth['skipped'])}", record["num_prompts"])],
        )
    click.echo(f"wrote {output}")

"""`latentrt export SOURCE -o BUNDLE`."""

from __future__ import annotations

import click

from latentrt.cli.format import echo_table


@click.command("export")
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(), help="Bundle directory to create.")
@click.option("--opset", default=18, show_default=True, help="ONNX opset (>= 18).")
@click.option("--max-batch", type=click.IntRange(min=1), default=4, show_default=True, help="Most images per call the bundle is validated for.")
@click.option("--max-sequence-length", type=int, default=None,
              help="T5 prompt length (default: the family's, as diffusers: SD3 256, Flux 512, PixArt 120; 0 drops T5 tokens).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Half precision keeps overflowing ops, normalisations and softmax in fp32 automatically.")
@click.option("--vae-precision", type=click.Choice(["same", "fp32"]), default="same", show_default=True,
              help="fp32 keeps the VAE decoder in fp32 whatever --precision is.")
@click.option("--streaming", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Export block by block with weights read from the checkpoint as needed (auto: components over 1 GiB).")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty output directory.")
def command(source, output, opset, max_batch, max_sequence_length, precision, vae_precision, streaming, overwrite) -> None:
    """Export SOURCE (a diffusers pipeline directory or a preset such as tiny-sd3) to an ONNX bundle.

    Every component is exported with named dynamic axes, run on ONNX Runtime against PyTorch, and the
    export fails (nothing written) if they disagree: relative L2 above 1e-4 in fp32, 1e-2 in fp16,
    3e-2 in bf16.
    """
    from latentrt.export.pipeline import ExportConfig, export_pipeline

    _quiet_third_party(click.get_current_context().find_root().params.get("verbose", 0))
    config = ExportConfig(
        opset=opset,
        max_batch=max_batch,
        max_sequence_length=max_sequence_length,
        precision=precision,
        vae_precision=vae_precision,
        overwrite=overwrite,
        streaming=streaming,
    )
    manifest = export_pipeline(source, output, config, progress=lambda name: click.echo(f"exporting {name} ...", err=True))
    rows = [
        (name, c.precision, f"{max(max(v.rel_l2.values()) for v in c.validation):.1e}")
        for name, c in manifest.components.items()
    ]
    echo_table(("component", "precision", "worst rel. L2 vs torch"), rows)
    click.echo(f"wrote {output}")


def _quiet_third_party(verbose: int) -> None:
    """diffusers and transformers draw progress bars and advice while loading; keep the CLI's output ours."""
    if verbose:
        return
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()

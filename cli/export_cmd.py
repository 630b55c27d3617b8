"""`latentrt export SOURCE -o BUNDLE`."""

from __future__ import annotations

import click

from latentrt.cli.format import echo_table


@click.command("export")
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(), help="Bundle directory to create.")
@click.option("--opset", default=18, show_default=True, help="ONNX opset (>= 18).")
@click.option("--max-batch", default=4, show_default=True, help="Most images per call the bundle is validated for.")
@click.option("--max-sequence-length", default=256, show_default=True, help="T5 prompt length (0 drops T5 tokens).")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty output directory.")
def command(source: str, output: str, opset: int, max_batch: int, max_sequence_length: int, overwrite: bool) -> None:
    """Export SOURCE (a diffusers pipeline directory or a preset such as tiny-sd3) to an ONNX bundle.

    Every component is exported with named dynamic axes, run on ONNX Runtime against PyTorch, and the
    export fails (nothing written) if they disagree.
    """
    from latentrt.export.pipeline import ExportConfig, export_pipeline

    _quiet_third_party(click.get_current_context().find_root().params.get("verbose", 0))
    config = ExportConfig(opset=opset, max_batch=max_batch, max_sequence_length=max_sequence_length, overwrite=overwrite)
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

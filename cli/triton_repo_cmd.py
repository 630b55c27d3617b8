"""`latentrt triton-repo BUNDLE -o REPO`: a Triton model repository for a standalone tritonserver."""

from __future__ import annotations

import click


@click.command("triton-repo")
@click.argument("bundle", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="The repository folder to write.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="tensorrt: GPU instances on engines built by `latentrt build`; onnxruntime: CPU instances.")
@click.option("--model-name", default="latentrt", show_default=True)
@click.option("--instances", type=int, default=1, show_default=True, help="Model instances per device.")
@click.option("--max-batch", type=int, default=None, help="Most images per batch (default: what one pipeline call takes with guidance).")
@click.option("--max-queue-delay-ms", type=float, default=5.0, show_default=True)
@click.option("--max-steps", type=int, default=100, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
def command(bundle, output, backend, model_name, instances, max_batch, max_queue_delay_ms, max_steps, overwrite) -> None:
    """Write a Triton model repository serving BUNDLE (copied into it), with a README on running and scaling it."""
    from latentrt.serve.repository import ModelConfig, write_repository

    config = ModelConfig(name=model_name, backend=backend, instances=instances, max_batch=max_batch,
                         max_queue_delay_ms=max_queue_delay_ms, max_steps=max_steps)
    repo = write_repository(bundle, output, config, overwrite=overwrite)
    click.echo(f"wrote {repo} (model '{model_name}'; see {repo / 'README.md'})")

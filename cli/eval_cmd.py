"""`latentrt eval BUNDLE`: attribute accuracy on the demo task, optionally against a reference bundle."""

from __future__ import annotations

from pathlib import Path

import click

from latentrt.cli.format import echo_table
from latentrt.cli.params import FINITE_FLOAT, POSITIVE, SEED, check_file_output, save_json


@click.command("eval")
@click.argument("bundle", type=click.Path())
@click.option("--compare", "reference", type=click.Path(), default=None,
              help="A reference bundle (e.g. fp32) to compare BUNDLE's images with, from the same latents (PSNR).")
@click.option("--steps", type=POSITIVE, default=None, help="Denoising steps (default 16).")
@click.option("--guidance", type=FINITE_FLOAT, default=None, help="Guidance scale (default 3.0).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt", "openvino"]), default="onnxruntime", show_default=True,
              help="What runs BUNDLE.")
@click.option("--reference-backend", type=click.Choice(["onnxruntime", "tensorrt", "openvino"]), default="onnxruntime", show_default=True,
              help="What runs the --compare bundle (onnxruntime: float32 everywhere).")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Write the numbers as JSON.")
def command(bundle, reference, steps, guidance, seed, backend, reference_backend, json_path) -> None:
    """Generate the demo's fixed prompt list (seen and held-out attribute combinations) and score each
    image with the demo's deterministic analyser: shape, colour, size, position, background.

    `--compare REF` also measures PSNR against REF's images from the same latents; with
    `--backend openvino --compare BUNDLE` that is OpenVINO's bf16 (or int8) against ONNX Runtime's float32."""
    from tqdm import tqdm

    from latentrt.models.demo import evaluate
    from latentrt.models.demo.bundle_eval import evaluate_bundle

    if json_path:
        json_path = check_file_output(Path(json_path), inputs={"bundle": bundle, "reference bundle": reference})
    kwargs = dict(
        steps=evaluate.DEFAULT_STEPS if steps is None else steps,
        guidance=evaluate.DEFAULT_GUIDANCE if guidance is None else guidance,
        seed=seed,
    )
    with tqdm(desc="generating", unit="image", leave=False) as bar:
        def progress(done, total):
            bar.total = total
            bar.n = done
            bar.refresh()

        result = evaluate_bundle(bundle, reference=reference, progress=progress, backend=backend, reference_backend=reference_backend, **kwargs)
    blocks = {"": result} if reference is None else {"reference ": result["reference"], "candidate ": result["quantized"]}
    rows = []
    for label, r in blocks.items():
        for split in ("seen", "held_out"):
            s = r[split]
            rows.append((label + split, f"{s['overall']:.3f}", *(f"{s[a]:.3f}" for a in ("shape", "colour", "size", "position", "background")), int(s["count"])))
    echo_table(("prompts", "overall", "shape", "colour", "size", "position", "background", "n"), rows)
    if reference is not None:
        click.echo(f"PSNR against the reference: mean {result['psnr_db_mean']:.2f} dB, min {min(result['psnr_db']):.2f} dB")
    if json_path:
        save_json(result, json_path)
        click.echo(f"wrote {json_path}")

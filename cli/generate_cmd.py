"""`latentrt generate BUNDLE --prompt ... -o out.png`."""

from __future__ import annotations

from pathlib import Path

import click

from latentrt.cli.format import echo_table, timing_rows
from latentrt.cli.lora_cmd import LORA
from latentrt.cli.params import FINITE_FLOAT, POSITIVE, SEED, check_file_output, image_format, save_image


@click.command("generate")
@click.argument("bundle", type=click.Path())
@click.option("-p", "--prompt", required=True, multiple=True, help="Prompt (repeat for several).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Image path (.png, .jpg, ...); several images get _0, _1, ... suffixes.")
@click.option("-n", "--negative-prompt", default=None, help="Negative prompt for classifier-free guidance.")
@click.option("--steps", type=POSITIVE, default=None, help="Denoising steps (default: the bundle's).")
@click.option("--guidance", type=FINITE_FLOAT, default=None, help="Guidance scale; <= 1 disables guidance.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--height", type=POSITIVE, default=None)
@click.option("--width", type=POSITIVE, default=None)
@click.option("--num-images", type=POSITIVE, default=1, show_default=True, help="Images per prompt.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt", "openvino"]), default="onnxruntime", show_default=True,
              help="openvino: CPU, with bf16 / int8 matrix units where the CPU has them.")
@click.option("--grid", is_flag=True, help="Write all images into one PNG, each prompt under its image.")
@click.option("--lora", "loras", type=LORA, multiple=True, help="A LoRA .safetensors file and its weight, FILE[:WEIGHT] (repeatable; mixed).")
def command(bundle, prompt, output, negative_prompt, steps, guidance, seed, height, width, num_images, backend, grid, loras) -> None:
    """Generate images from BUNDLE and print the per-stage timing table.

    Each image is encoded in memory and written atomically: an interrupted run or a full disk
    leaves no empty or partial file.
    """
    from tqdm import tqdm

    from latentrt.runtime.pipeline import Pipeline

    # The output is checked before the bundle is loaded (its numbered siblings share its folder and format).
    check_file_output(Path(output), inputs={"bundle": bundle})
    image_format(Path(output))
    pipe = Pipeline.load(bundle, backend=backend)
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(path, adapter_name=f"lora_{i}")
    if loras:
        pipe.set_adapters([f"lora_{i}" for i in range(len(loras))], adapter_weights=[weight for _, weight in loras])
    bars: list = []  # drawn from the first step on: a refused call prints nothing but its error

    def progress(step: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="denoising", unit="step", leave=False))
        _advance(bars[0], step)

    try:
        out = pipe(
            list(prompt),
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            num_images_per_prompt=num_images,
            seed=seed,
            callback=progress,
        )
    finally:
        for bar in bars:
            bar.close()
    if grid:
        from latentrt.cli.grid import make_grid

        paths = [Path(output)]
        save_image(make_grid(out.images, [p for p in prompt for _ in range(num_images)]), paths[0])
    else:
        paths = _output_paths(Path(output), len(out.images))
        for image, path in zip(out.images, paths):
            save_image(image, path)
    echo_table(("stage", "ms"), timing_rows(out.timings))
    for path in paths:
        click.echo(f"wrote {path}")


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(count)]


def _advance(bar, step: int) -> None:
    """One denoising step done; more images than one pass holds run in chunks, each from step 1."""
    if step == 1 and bar.n:
        bar.reset()
    bar.update(1)

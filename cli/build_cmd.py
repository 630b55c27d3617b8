"""`latentrt build BUNDLE`: TensorRT / TensorRT-RTX engines into BUNDLE/engines/."""

from __future__ import annotations

import click

from latentrt.cli.format import echo_table
from latentrt.cli.params import POSITIVE


@click.command("build")
@click.argument("bundle", type=click.Path())
@click.option(
    "--target",
    type=click.Choice(["auto", "tensorrt", "tensorrt-rtx"]),
    default="auto",
    show_default=True,
    help="auto: what runs on this machine's GPU (NVIDIA TensorRT if installed, else TensorRT-RTX for this GPU); "
    "without a GPU, TensorRT-RTX ahead of time.",
)
@click.option("--batch", default=None, help="Images per call, MIN:OPT:MAX or N (default: the manifest's ranges).")
@click.option("--size", default=None, help="Image size in pixels, MINxMIN:OPTxOPT:MAXxMAX.")
@click.option("--static", "static", default=None, help="One static image size HxW (instead of --size).")
@click.option("--text-len", default=None, help="T5 tokens, MIN:OPT:MAX or N.")
@click.option("--no-cfg", is_flag=True, help="Profiles without the classifier-free-guidance batch doubling.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True, help="Builder optimization level.")
@click.option("--workspace-mb", type=POSITIVE, default=None, help="Workspace memory pool limit (MiB, >= 1).")
@click.option("--timing-cache", type=click.Path(), default=None, help="Timing cache file to reuse (NVIDIA TensorRT).")
@click.option("--components", default=None, help="Comma-separated components to build (default: all).")
@click.option("--compute-capability", "ccs", multiple=True, help="TensorRT-RTX target, e.g. 8.6 (repeatable).")
@click.option(
    "--weights",
    type=click.Choice(["embedded", "refittable", "stripped"]),
    default="embedded",
    show_default=True,
    help="refittable: new weights (LoRA) without a rebuild; stripped: no weights in the engine, refitted from the bundle at load.",
)
@click.option("--rebuild", is_flag=True, help="Build even when a current engine exists.")
def command(bundle, target, batch, size, static, text_len, no_cfg, opt_level, workspace_mb, timing_cache, components, ccs, weights, rebuild) -> None:
    """Build engines for BUNDLE's components, skipping those already built with the same inputs and settings.

    Precision comes from the ONNX (strongly typed networks). Profiles come from the manifest's
    dynamic axes narrowed by --batch/--size/--static/--text-len; bad requests fail before any build.
    """
    from tqdm import tqdm

    from latentrt.engines import BuildConfig, build_engines, parse_batch, parse_image_size, parse_text_length
    from latentrt.engines.memory import EngineMemory, format_bytes, pipeline_memory
    from latentrt.errors import InputError

    if size and static:
        raise InputError("pass either --size MIN:OPT:MAX or --static HxW, not both")
    config = BuildConfig(
        target=target,
        compute_capabilities=tuple(ccs),
        batch=parse_batch(batch) if batch else None,
        image_size=parse_image_size(static or size) if (static or size) else None,
        text_length=parse_text_length(text_len) if text_len else None,
        guidance="none" if no_cfg else "cfg",
        opt_level=opt_level,
        workspace=workspace_mb * 2**20 if workspace_mb else None,
        timing_cache=timing_cache,
        components=tuple(c.strip() for c in components.split(",")) if components else (),
        reuse="rebuild" if rebuild else "cache",
        weights=weights,
    )
    bar = tqdm(desc="building", unit="step", leave=False)

    def progress(event) -> None:
        if event.event == "component_start":
            bar.set_description(f"building {event.component}")
        elif event.event == "step":
            bar.update(1)

    try:
        results = build_engines(bundle, config, progress=progress)
    finally:
        bar.close()
    memory = {r.component: EngineMemory(r.record.memory.get("weights"), r.record.memory.get("activations"), r.record.memory.get("io")) for r in results}
    echo_table(
        ("component", "status", "build s", "engine", "weights", "activations", "I/O at max", "file"),
        [
            (
                r.component, r.status, f"{r.record.build_seconds:.1f}", format_bytes(r.record.engine_bytes),
                format_bytes(memory[r.component].weights), format_bytes(memory[r.component].activations),
                format_bytes(memory[r.component].io), r.engine.name,
            )
            for r in results
        ],
    )
    need = pipeline_memory(memory)
    target_name = results[0].record.spec.library if results else target
    click.echo(
        f"\nGPU memory at the profiles' max ({target_name}, as the builder reported): {format_bytes(need.total)} = weights "
        f"{format_bytes(need.weights)} + one shared activation buffer {format_bytes(need.activations)} + I/O {format_bytes(need.io)}"
        + (f" (not known for {', '.join(need.unknown)})" if need.unknown else "")
    )

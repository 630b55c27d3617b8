"""`latentrt build BUNDLE`: TensorRT / TensorRT-RTX engines into BUNDLE/engines/."""

from __future__ import annotations

import click

from latentrt.cli.format import echo_table
from latentrt.cli.params import POSITIVE


@click.command("build")
@click.argument("bundle", type=click.Path())
@click.option("--target", type=click.Choice(["tensorrt", "tensorrt-rtx"]), default="tensorrt-rtx", show_default=True)
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
@click.option("--rebuild", is_flag=True, help="Build even when a current engine exists.")
def command(bundle, target, batch, size, static, text_len, no_cfg, opt_level, workspace_mb, timing_cache, components, ccs, rebuild) -> None:
    """Build engines for BUNDLE's components, skipping those already built with the same inputs and settings.

    Precision comes from the ONNX (strongly typed networks). Profiles come from the manifest's
    dynamic axes narrowed by --batch/--size/--static/--text-len; bad requests fail before any build.
    """
    from tqdm import tqdm

    from latentrt.engines import BuildConfig, build_engines, parse_batch, parse_image_size, parse_text_length
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
    echo_table(
        ("component", "status", "build s", "engine MiB", "file"),
        [
            (r.component, r.status, f"{r.record.build_seconds:.1f}", f"{r.record.engine_bytes / 2**20:.1f}", r.engine.name)
            for r in results
        ],
    )

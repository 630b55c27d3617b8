"""`latentrt inspect BUNDLE`."""

from __future__ import annotations

import os

import click

from latentrt.cli.format import echo_table


def _shape(spec) -> str:
    return f"{spec.name}[{','.join(str(d) for d in spec.shape)}] {spec.dtype}"


@click.command("inspect")
@click.argument("bundle", type=click.Path())
def command(bundle: str) -> None:
    """Print a readable summary of BUNDLE's manifest (and verify its files)."""
    from latentrt.bundle.manifest import load_manifest

    m = load_manifest(bundle)
    click.echo(f"bundle:    {bundle}")
    click.echo(f"family:    {m.family}   (schema {m.schema_version}, latentrt {m.latentrt_version}, source {m.source})")
    lat = m.latent
    click.echo(
        f"latents:   {lat.channels} channels, /{lat.vae_scale_factor}, decoder input = latents / {lat.scaling_factor} + {lat.shift_factor}"
    )
    d = m.defaults
    click.echo(
        f"defaults:  {d.height}x{d.width}, {d.num_inference_steps} steps, guidance {d.guidance_scale}, T5 length {d.max_sequence_length}"
    )
    click.echo(f"scheduler: {m.scheduler.get('class_name')} (shift {m.scheduler.get('config', {}).get('shift')})")
    click.echo("")
    rows = []
    for name, c in m.components.items():
        size = os.path.getsize(os.path.join(bundle, c.file)) + sum(os.path.getsize(os.path.join(bundle, f)) for f in c.external_data)
        worst = max((max(v.rel_l2.values()) for v in c.validation), default=None)
        rows.append((name, c.precision, f"{size / 2**20:.1f} MiB", "-" if worst is None else f"{worst:.1e}", "; ".join(_shape(s) for s in c.inputs)))
    echo_table(("component", "precision", "size", "rel. L2", "inputs"), rows)
    click.echo("")
    axes = [(name, axis, f"{r.min}..{r.max} (opt {r.opt}, x{r.multiple_of})") for name, c in m.components.items() for axis, r in c.axes.items()]
    echo_table(("component", "axis", "range"), axes)
    click.echo("")
    echo_table(("tokenizer", "file", "max length", "pad id"), [(n, t.file, t.max_length, t.pad_id) for n, t in m.tokenizers.items()])

    from latentrt.engines import inspect_engines
    from latentrt.engines.memory import EngineMemory, format_bytes, pipeline_memory

    statuses = inspect_engines(bundle)
    click.echo("")
    if not statuses:
        click.echo("engines:   none built (latentrt build BUNDLE)")
        return

    def memory(record) -> EngineMemory:
        m = record.memory if record else {}
        return EngineMemory(m.get("weights"), m.get("activations"), m.get("io"))

    echo_table(
        ("engine", "status", "target", "compute capability", "weights", "activations", "I/O at max", "why"),
        [
            (
                s.path.name,
                s.status,
                f"{s.record.spec.library} {s.record.spec.library_version}" if s.record else "",
                ",".join(s.record.spec.compute_capabilities) or "default" if s.record else "",
                format_bytes(memory(s.record).weights),
                format_bytes(memory(s.record).activations),
                format_bytes(memory(s.record).io),
                "; ".join(s.reasons),
            )
            for s in statuses
        ],
    )
    # What a pipeline loading the newest current engine of each component needs on the GPU.
    newest = {}
    for s in statuses:
        if s.status == "current" and (s.component not in newest or s.record.created >= newest[s.component].created):
            newest[s.component] = s.record
    if newest:
        need = pipeline_memory({name: memory(r) for name, r in newest.items()})
        click.echo(
            f"\nGPU memory at the profiles' max (newest current engines, as the builder reported): {format_bytes(need.total)} = "
            f"weights {format_bytes(need.weights)} + one shared activation buffer {format_bytes(need.activations)} "
            f"({format_bytes(need.activations_if_not_shared)} if each engine had its own) + I/O {format_bytes(need.io)}"
            + (f"; not known for {', '.join(need.unknown)} (built before latentrt recorded it)" if need.unknown else "")
        )

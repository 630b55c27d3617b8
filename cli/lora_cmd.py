"""`latentrt lora BUNDLE --lora FILE[:WEIGHT] ... -o OUT`: a bundle with LoRA adapters merged in."""

from __future__ import annotations

import math

import click

from latentrt.cli.format import echo_table


class LoraSpec(click.ParamType):
    """`FILE[:WEIGHT]`: a LoRA file and its weight (default 1.0)."""

    name = "FILE[:WEIGHT]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        path, sep, weight = str(value).rpartition(":")
        if sep:
            try:
                number = float(weight)
            except ValueError:
                path, number = str(value), 1.0  # a ':' inside the path itself
            else:
                if not math.isfinite(number):
                    self.fail(f"the weight of {value!r} must be a finite number, got {weight!r}", param, ctx)
        else:
            path, number = str(value), 1.0
        if not path:
            self.fail(f"{value!r} names no file; expected FILE[:WEIGHT], e.g. style.safetensors:0.8", param, ctx)
        return path, number


LORA = LoraSpec()


@click.command("lora")
@click.argument("bundle", type=click.Path())
@click.option("--lora", "loras", type=LORA, multiple=True, required=True, help="A LoRA .safetensors file and its weight (repeatable).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Bundle directory to create.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty output directory.")
def command(bundle, loras, output, overwrite) -> None:
    """Write a copy of BUNDLE with the LoRA adapters merged into its weights.

    Components the adapters touch are rewritten (new sha256s); the manifest records which adapters
    were merged at which weights. Built engines are not copied: build them again from the new bundle.
    """
    from latentrt.runtime.lora.bundle import merge_lora_bundle

    manifest = merge_lora_bundle(bundle, output, list(loras), overwrite=overwrite)
    record = manifest.extra["lora"]
    echo_table(("adapter", "weight", "components"), [(a["file"], f"{a['weight']:g}", ", ".join(a["components"])) for a in record["adapters"]])
    click.echo(f"wrote {output} ({', '.join(sorted(record['base_sha256']))} rewritten)")

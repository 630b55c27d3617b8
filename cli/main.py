"""The `latentrt` command: a thin layer over the library, one module per subcommand."""

from __future__ import annotations

import logging
import sys

import click

from latentrt._version import __version__
from latentrt.errors import LatentRTError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="latentrt")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
def cli(debug: bool, verbose: int) -> None:
    """Export diffusers text-to-image pipelines to ONNX bundles, build TensorRT engines, and run them without torch."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _register() -> None:
    from latentrt.cli import bench_cmd, build_cmd, calibrate_cmd, debug_cmd, eval_cmd, export_cmd, generate_cmd, inspect_cmd

    for module in (export_cmd, generate_cmd, inspect_cmd, build_cmd, calibrate_cmd, eval_cmd, debug_cmd, bench_cmd):
        cli.add_command(module.command)


_register()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input or failed export, 130 interrupted)."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        cli.main(args=args, prog_name="latentrt", standalone_mode=False)
    except click.exceptions.Exit as err:
        return err.exit_code
    except click.ClickException as err:
        err.show()
        return 2
    except (click.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        return 130
    except LatentRTError as err:
        if "--debug" in args:
            raise
        click.echo(f"error: {err}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

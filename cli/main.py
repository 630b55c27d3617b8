"""The `latentrt` command: a thin layer over the library, one module per subcommand."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Iterator

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
    from latentrt.cli import (
        bench_cmd, build_cmd, calibrate_cmd, debug_cmd, eval_cmd, export_cmd, generate_cmd, inspect_cmd, lora_cmd, serve_cmd,
        triton_repo_cmd,
    )

    for module in (export_cmd, generate_cmd, inspect_cmd, build_cmd, calibrate_cmd, eval_cmd, lora_cmd, debug_cmd, bench_cmd, serve_cmd, triton_repo_cmd):
        cli.add_command(module.command)


_register()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that cleanup (`finally`, temporary bundles) runs."""


@contextlib.contextmanager
def _terminate_as_exception() -> Iterator[None]:
    """Turn the first SIGTERM into `Terminated` for the duration of a command (later ones are ignored
    while cleanup runs); the previous handler is restored afterwards."""

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input or failed export, 130 interrupted, 143 terminated).

    Every error the user can cause is one line on stderr (`error: ...`); `--debug` shows the traceback.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    try:
        with _terminate_as_exception():
            cli.main(args=args, prog_name="latentrt", standalone_mode=False)
    except click.exceptions.Exit as err:
        return err.exit_code
    except click.ClickException as err:
        if debug:
            raise
        hint = f" (see `latentrt {err.ctx.info_name} --help`)" if isinstance(err, click.UsageError) and err.ctx and err.ctx.parent else ""
        click.echo(f"error: {err.format_message()}{hint}", err=True)
        return 2
    except (click.Abort, KeyboardInterrupt) as err:  # click turns KeyboardInterrupt into Abort
        if isinstance(err, Terminated) or isinstance(err.__context__, Terminated):
            click.echo("terminated", err=True)
            return 143
        click.echo("interrupted", err=True)
        return 130
    except LatentRTError as err:
        if debug:
            raise
        click.echo(f"error: {_one_line(err)}", err=True)
        return 2
    except OSError as err:  # the disk, the file system or permissions: not a bug in latentrt
        if debug:
            raise
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        click.echo(f"error: {err.strerror or err}{where}", err=True)
        return 2
    return 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())

"""Argument types and output checks shared by the subcommands: every bad value is refused with one
line before any model is loaded or any file is created."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import click

from latentrt.errors import InputError


class FiniteFloat(click.ParamType):
    """A float that is neither NaN nor infinite (click's FLOAT accepts both)."""

    name = "float"

    def convert(self, value, param, ctx):
        if isinstance(value, float) and math.isfinite(value):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE_FLOAT = FiniteFloat()
#: seeds numpy's generator, which takes integers >= 0
SEED = click.IntRange(min=0)
POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)


def image_format(path: Path) -> str:
    """The PIL format that writes `path` (from its extension), or an InputError listing the choices."""
    from PIL import Image

    Image.init()
    formats = {ext: fmt for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    fmt = formats.get(path.suffix.lower())
    if fmt is None:
        common = ", ".join(e for e in (".png", ".jpg", ".webp", ".bmp", ".tiff") if e in formats)
        got = f"the extension {path.suffix!r}" if path.suffix else "no extension"
        raise InputError(f"output {path} has {got}; name the image file with a format's extension ({common})")
    return fmt


def check_file_output(path: str | os.PathLike, *, inputs: dict[str, str | os.PathLike | None] | None = None) -> Path:
    """Check that a file can be written at `path` before any work: not a directory, its folder exists
    and is writable, and it does not lie inside an input (`bundle.check_disjoint`)."""
    from latentrt.bundle.writer import check_disjoint

    path = Path(path)
    if path.is_dir():
        raise InputError(f"output {path} is a directory; give a file path inside it, e.g. {path / 'out.png'}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"cannot write {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: no write permission on {folder} (or it is read-only); choose another folder")
    if inputs:
        check_disjoint(path, inputs)
    return path


def save_image(image, path: Path) -> None:
    """Encode `image` in memory, then write it atomically: a full disk leaves no empty or partial file."""
    from latentrt.bundle.writer import atomic_write

    buffer = io.BytesIO()
    image.save(buffer, format=image_format(path))
    atomic_write(path, buffer.getbuffer())


def save_json(data: object, path: Path) -> None:
    import json

    from latentrt.bundle.writer import atomic_write

    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())

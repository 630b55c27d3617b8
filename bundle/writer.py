"""Writing atomically: a bundle into a temporary sibling directory renamed into place at the end, a
file (an engine, its metadata) into a temporary sibling file renamed over it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from latentrt.errors import InputError


def check_output_dir(output: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, a non-empty directory (unless `overwrite`), or unwritable."""
    if output.exists() and not output.is_dir():
        raise InputError(f"output {output} exists and is a file; choose a directory path for the bundle")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise InputError(f"output {output} is not empty; pass --overwrite to replace it or choose another path")
    parent = output.parent if output.parent != Path("") else Path(".")
    if not parent.is_dir():
        raise InputError(f"cannot write {output}: its parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write {output}: no write permission on {parent}")


@contextlib.contextmanager
def writing_bundle(output: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `output`; on success it replaces `output`, on any error
    (or interrupt) it is removed, so a failed write never leaves a half bundle behind.

    An existing `output` is removed only once the new bundle is in place.
    """
    output = Path(output)
    check_output_dir(output, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a bundle gets the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(output)


def atomic_write(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

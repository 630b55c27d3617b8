"""Writing atomically: a bundle into a temporary sibling directory swapped into place at the end, a
file (an engine, its metadata, an image) into a temporary sibling file renamed over it.

What holds, whatever happens (an exception, SIGINT/SIGTERM, SIGKILL, a full disk, a power cut
after the rename returned):

- `OUTPUT` holds either the old bundle or the new one, never a mix and never nothing: an existing
  bundle is swapped with the new one in one `renameat2(RENAME_EXCHANGE)` (Linux; elsewhere, or on a
  file system without it, two renames, and a run killed between them is repaired by the next one);
- the temporaries are named `.<OUTPUT name>.tmp-<pid>-<random>` (and `.old-<pid>-<random>` for the
  two-rename fallback) and each is locked (`flock`) by the process writing it for as long as it
  lives. The next write to the same output takes every unlocked one as a leftover of a killed run:
  an `.old` whose output is missing is renamed back, the rest are removed. A locked one means
  another process is writing that output now: the second writer fails at once instead of both
  "succeeding" with one result overwriting the other;
- files (`atomic_write`) are written under `.<name>.<random>.tmp`, flushed, fsynced and renamed;
  leftovers of killed writers are removed the same way.

Refusing outputs that would destroy an input (`check_disjoint`) lives here too: an output that is,
contains, or lies inside an input is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from latentrt.errors import InputError, LatentRTError

logger = logging.getLogger(__name__)

#: free bytes under which a failed write is blamed on a full disk whatever the library reported
_NEARLY_FULL = 1 << 20
_PARENT_LOCK_TIMEOUT_S = 60.0


def check_disjoint(output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuse an output that is, contains, or lies inside one of `inputs` (after symbolic links).

    Replacing such an output would delete or corrupt the input (`export SRC -o SRC --overwrite`,
    `calibrate B -o <parent of B> --overwrite`, `generate B -o B/manifest.json`).

    Args:
        inputs: {what the error calls it ("source pipeline", "input bundle"): path}; None is skipped.

    Raises:
        InputError: naming the output, the input and how they overlap.
    """
    out = Path(os.path.realpath(output))
    for what, path in inputs.items():
        if path is None or not os.path.lexists(path):
            continue
        src = Path(os.path.realpath(path))
        if out == src:
            relation = "is"
        elif src.is_relative_to(out):
            relation = "contains"
        elif out.is_relative_to(src):
            relation = "lies inside"
        else:
            continue
        raise InputError(
            f"output {output} {relation} the {what} {path}: writing it would overwrite or delete the {what}; "
            "choose an output path outside it (and not one of its parent folders)"
        )


def check_output_dir(output: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an output that is a file, a non-empty directory (unless `overwrite`), or unwritable."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise InputError(f"output {output} exists and is a file; choose a directory path for the bundle")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise InputError(f"output {output} is not empty; pass --overwrite to replace it or choose another path")
    parent = output.parent if output.parent != Path("") else Path(".")
    if not parent.is_dir():
        raise InputError(f"cannot write {output}: its parent directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {output}: no write permission on {parent} (or it is read-only); choose another path")


@contextlib.contextmanager
def writing_bundle(
    output: str | os.PathLike, *, overwrite: bool = False, inputs: Mapping[str, str | os.PathLike | None] | None = None
) -> Iterator[Path]:
    """Yield a temporary directory next to `output`; on success it replaces `output` atomically, on
    any error (or interrupt) it is removed, so a failed write never leaves a half bundle behind.

    Args:
        overwrite: allow replacing a non-empty `output` (checked again at the swap: a bundle another
            process wrote there meanwhile is not replaced without it).
        inputs: paths the output must not overlap (`check_disjoint`).

    Raises:
        InputError: the output is unusable (a file, not empty, overlaps an input, unwritable), another
            process is writing it, or the disk filled up / turned read-only while writing.
    """
    output = _output_path(output)
    if inputs:
        check_disjoint(output, inputs)
    check_output_dir(output, overwrite)
    with _locked_parent(output.parent):
        recover_leftovers(output)
        check_output_dir(output, overwrite)  # again: a recovered bundle may now be there
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-{os.getpid()}-", dir=output.parent))
        except OSError as err:
            raise _unwritable(output, err) from err
        try:
            lock = _lock(tmp, blocking=False)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:
        logger.info("writing bundle %s in %s", output, tmp)
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a bundle gets the usual permissions
        yield tmp
        with _locked_parent(output.parent):
            if output.is_dir() and any(output.iterdir()) and not overwrite:
                raise InputError(f"output {output} was written by another process meanwhile; pass --overwrite to replace it")
            _fsync_tree(tmp)
            logger.info("replacing %s with %s", output, tmp)
            displaced = _swap_into_place(tmp, output)
            logger.info("%s is in place%s", output, f"; removing the previous bundle {displaced.name}" if displaced else "")
    except BaseException as err:
        blame = _blame_output(err, output.parent)  # before the temporary bundle's space is freed
        os.close(lock)
        shutil.rmtree(tmp, ignore_errors=True)
        if blame:
            raise _unwritable(output, err) from err
        raise
    os.close(lock)
    if displaced is not None:
        shutil.rmtree(displaced, ignore_errors=True)
    logger.info("wrote bundle %s", output)


def recover_leftovers(output: str | os.PathLike) -> None:
    """Deal with the temporaries a killed writer of `output` left beside it.

    An unlocked `.old` (the old bundle, moved aside by the two-rename fallback) is renamed back when
    `output` is missing, else removed; an unlocked `.tmp` (a half-written bundle, or the old one after
    the swap) is removed. Only names of our own pattern for this output are touched.

    Raises:
        InputError: one of them is locked: another live process is writing `output`.
    """
    output = Path(output)
    pattern = _leftover_pattern(output.name)
    try:
        names = sorted(os.listdir(output.parent or "."))
    except OSError:
        return
    found = [(m.group("kind"), output.parent / name) for name in names if (m := pattern.match(name))]
    for kind, path in sorted(found, key=lambda item: item[0] != "old"):  # restore an .old before anything else
        if path.is_symlink() or not path.is_dir():
            continue
        try:
            fd = _lock(path, blocking=False)
        except BlockingIOError:
            pid = _pid_of(path.name)
            raise InputError(
                f"another process{f' (pid {pid})' if pid else ''} is writing {output} right now (its temporary folder "
                f"{path.name} is locked); wait for it to finish or choose another output"
            ) from None
        except OSError:
            continue
        try:
            if kind == "old" and not output.exists():
                path.rename(output)
                logger.warning("%s was missing after an interrupted replace: restored the previous bundle from %s", output, path.name)
            else:
                shutil.rmtree(path, ignore_errors=True)
                logger.info("removed %s, left by an interrupted write of %s", path.name, output)
        finally:
            os.close(fd)


def link_bundle_files(bundle: str | os.PathLike, target: str | os.PathLike, skip: set[str]) -> None:
    """Hard-link (or copy, across file systems) the files of `bundle` into `target`, except the
    relative paths in `skip`, the manifest and built engines: for a new bundle that rewrites some
    components of another (calibration, merged LoRA)."""
    bundle, target = Path(bundle), Path(target)
    for path in sorted(bundle.rglob("*")):
        rel = path.relative_to(bundle).as_posix()
        if rel in skip or rel == "manifest.json" or rel.split("/")[0] == "engines" or not path.is_file():
            continue
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)
        except OSError:
            shutil.copy2(path, dest)


def atomic_write(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`.

    The file gets the permissions of a newly created file (0o666 minus the umask), not mkstemp's
    0o600. Temporaries of killed writers of the same `path` are removed first.

    Raises:
        InputError: the folder is missing, the disk is full, or the folder is read-only / not
            writable; no partial file is left at `path` or beside it.
    """
    path = Path(os.path.abspath(path))  # a symbolic link is replaced, not followed
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory; give a file path")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: its folder {path.parent} does not exist; create it first")
    _remove_stale_files(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _unwritable(path, err) from err
    try:
        with os.fdopen(fd, "wb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # from here on, cleanups by others skip it
            logger.debug("writing %s through %s", path, os.path.basename(tmp))
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # while the lock is held: a concurrent cleanup never sees it unlocked
        _fsync_dir(path.parent)
    except BaseException as err:
        blame = _blame_output(err, path.parent)
        Path(tmp).unlink(missing_ok=True)
        if blame:
            raise _unwritable(path, err) from err
        raise


def _umask() -> int:
    """The process's umask, read without changing it (setting it, even briefly, races other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _output_path(output: str | os.PathLike) -> Path:
    """Absolute; a symbolic link is followed, so the link stays and its target is replaced."""
    path = Path(os.path.abspath(output))
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _leftover_pattern(name: str) -> re.Pattern:
    # ours: .NAME.tmp-PID-XXXXXXXX and .NAME.old-PID-XXXXXXXX; before: .NAME.tmp-XXXXXXXX and .NAME.old-PID
    suffix = r"(?:-(?P<pid>\d+)-[a-z0-9_]{8}|-[a-z0-9_]{8}|-(?P<oldpid>\d+))"
    return re.compile(rf"^\.{re.escape(name)}\.(?P<kind>tmp|old){suffix}$")


def _pid_of(name: str) -> int | None:
    match = re.search(r"\.(?:tmp|old)-(\d+)-", name)
    return int(match.group(1)) if match else None


def _remove_stale_files(path: Path) -> None:
    """Remove `.<name>.<random>.tmp` files beside `path` that no live writer holds locked."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp$")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if not pattern.match(name):
            continue
        stale = path.parent / name
        try:
            fd = os.open(stale, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            stale.unlink(missing_ok=True)
            logger.info("removed %s, left by an interrupted write of %s", name, path)
        except OSError:  # locked: being written right now
            pass
        finally:
            os.close(fd)


def _lock(path: Path, *, blocking: bool) -> int:
    """An fd on `path` holding an exclusive flock (released when the fd is closed or the process dies)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _locked_parent(parent: Path) -> Iterator[None]:
    """Serialize the short check-and-create / swap sections of writers in one folder."""
    try:
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # an unreadable folder cannot be locked; the temporaries' own locks still hold
        yield
        return
    try:
        deadline = time.monotonic() + _PARENT_LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise InputError(f"another process has held a lock on {parent} for {_PARENT_LOCK_TIMEOUT_S:.0f} s; try again") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _swap_into_place(tmp: Path, output: Path) -> Path | None:
    """Put `tmp` at `output`; return where the old bundle now is (to delete), or None."""
    if not output.exists():
        os.rename(tmp, output)  # also replaces an empty directory atomically
        return None
    if _exchange(tmp, output):
        return tmp  # the old bundle, now under the temporary name (unlocked: a leftover if we die now)
    # Two renames: killed between them, `output` is missing and `.old` holds the old bundle, which the
    # next write restores (recover_leftovers).
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-{os.getpid()}-", dir=output.parent))
    os.rename(output, old)  # onto the empty directory: replaces it
    logger.info("moved the old bundle %s to %s", output, old.name)
    try:
        os.rename(tmp, output)
    except BaseException:
        os.rename(old, output)
        raise
    return old


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_tree(root: Path) -> None:
    """Flush every file of the new bundle before it becomes visible under the output's name."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _blame_output(err: BaseException, folder: Path) -> bool:
    """Whether a failed write should be reported as "this output cannot be written here"."""
    if isinstance(err, LatentRTError) or not isinstance(err, Exception):
        return False
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        return True
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM):
        return err.filename is not None and Path(os.path.abspath(err.filename)).is_relative_to(folder)
    # torch, onnx and safetensors report a failed write in their own words, most with the OS's text
    text = str(err)
    if any(os.strerror(code) in text for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)):
        return True
    return _nearly_full(folder)  # else blame a disk that has (almost) no room left


def _nearly_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _NEARLY_FULL


def _unwritable(output: Path, err: BaseException) -> InputError:
    code = getattr(err, "errno", None)
    if code is None and os.strerror(errno.EROFS) in str(err):
        code = errno.EROFS
    if code in (errno.EROFS,):
        why, fix = "the file system is read-only", "choose a writable location"
    elif code in (errno.EACCES, errno.EPERM):
        why, fix = "permission denied", "choose a folder you can write to"
    else:
        why, fix = "the disk is full", "free some space or choose another location"
    detail = getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0]
    return InputError(f"could not write {output}: {why} ({detail}); nothing was written, {fix}")

"""Paths a bundle names, checked before anything is opened: every one must resolve inside the bundle.

A manifest names files relative to the bundle (`onnx/transformer.onnx`, `tokenizer/tokenizer.json`),
and an ONNX file names its external-data files relative to its own folder. A crafted bundle could
name `../outside.onnx`, an absolute path, or a symbolic link to a file outside the bundle; loading it
would then read (and hash, and run) a file the bundle does not contain. `resolve_inside` refuses such
a path after resolving every symbolic link, and `onnx_external_data` lists the external-data
references of an ONNX file without loading it (a streaming protobuf walk over a memory map: the
tensors' bytes are skipped, not read), so they can be checked the same way before ONNX Runtime opens
them.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from latentrt.errors import BundleError


def resolve_inside(root: str | os.PathLike, relative: object, what: str) -> Path:
    """The real path of `relative` under `root`, refusing any path that leaves `root`.

    Args:
        root: the bundle directory (resolved here, so it may itself be a symbolic link).
        relative: a POSIX path relative to `root`, as the manifest stores it.
        what: how the error names the path, e.g. "component 'transformer' file".

    Raises:
        BundleError: `relative` is not a non-empty string, is absolute, contains '..', a NUL or a
            backslash, or resolves (after symbolic links) outside `root`.
    """
    real_root = Path(root).resolve()
    if not isinstance(relative, str) or not relative:
        raise BundleError(f"{what} must be a non-empty path relative to the bundle, got {relative!r}; the manifest is corrupt, re-export the bundle")
    pure = PurePosixPath(relative)
    if (
        pure.is_absolute()
        or PureWindowsPath(relative).drive
        or "\\" in relative
        or "\x00" in relative
        or ".." in pure.parts
    ):
        raise BundleError(
            f"{what} {relative!r} is not a plain path inside the bundle (absolute, '..', a backslash or NUL); "
            "a bundle may only name its own files: re-export it"
        )
    target = (real_root / pure).resolve()
    if not target.is_relative_to(real_root):
        raise BundleError(
            f"{what} {relative!r} resolves to {target}, outside the bundle {real_root} (a symbolic link?); "
            "a bundle may only name its own files: replace the link with the file itself or re-export the bundle"
        )
    return target


@dataclass(frozen=True)
class ExternalData:
    """One tensor whose bytes live outside the ONNX file: `location` relative to the model's folder."""

    tensor: str
    location: str
    offset: int
    length: int | None


def onnx_external_data(path: str | os.PathLike) -> list[ExternalData]:
    """Every external-data reference of the ONNX model at `path` (initializers, sparse initializers,
    tensor attributes of nodes in the graph, its subgraphs, functions and training graphs).

    Raises:
        BundleError: the file is not a well-formed ONNX protobuf.
    """
    path = Path(path)
    refs: list[ExternalData] = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise BundleError(f"{path} is empty, not an ONNX model; re-export the bundle")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            # Every external reference carries the key "location": a model without those bytes has
            # none (a C-speed scan; most bundles keep their weights inline and stop here).
            if buf.find(b"location") < 0:
                return refs
            try:
                _model(buf, 0, size, refs)
            except _Malformed as err:
                raise BundleError(f"{path} is not a well-formed ONNX model ({err}); the file is corrupt, re-export the bundle") from None
    return refs


class _Malformed(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed(f"bad varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf, pos: int, end: int):
    """(field number, wire type, value or (start, end)) for each field of one message."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed(f"field {number} at byte {pos} runs past its message")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 3:  # a (deprecated) group: skipped up to its end marker, as protobuf parsers do
            pos = _skip_group(buf, pos, end, number)
        else:
            raise _Malformed(f"unexpected wire type {wire} at byte {pos}")
    if pos != end:
        raise _Malformed("a field runs past its message")


def _skip_group(buf, pos: int, end: int, number: int) -> int:
    depth = [number]
    while depth:
        key, pos = _varint(buf, pos, end)
        n, wire = key >> 3, key & 7
        if wire == 0:
            pos = _varint(buf, pos, end)[1]
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            pos += length
        elif wire == 5:
            pos += 4
        elif wire == 3:
            depth.append(n)
        elif wire == 4 and n == depth[-1]:
            depth.pop()
        else:
            raise _Malformed(f"unbalanced group at byte {pos}")
        if pos > end:
            raise _Malformed("a group runs past its message")
    return pos


# Field numbers from onnx.proto (ONNX IR version 10).
def _model(buf, pos, end, refs):
    for number, wire, value in _fields(buf, pos, end):
        if wire != 2:
            continue
        if number == 7:  # ModelProto.graph
            _graph(buf, *value, refs)
        elif number == 20:  # ModelProto.training_info
            for n, w, v in _fields(buf, *value):
                if w == 2 and n in (1, 2):  # initialization, algorithm
                    _graph(buf, *v, refs)
        elif number == 25:  # ModelProto.functions
            for n, w, v in _fields(buf, *value):
                if w == 2 and n == 7:  # FunctionProto.node
                    _node(buf, *v, refs)
                elif w == 2 and n == 11:  # FunctionProto.attribute_proto
                    _attribute(buf, *v, refs)


def _graph(buf, pos, end, refs):
    for number, wire, value in _fields(buf, pos, end):
        if wire != 2:
            continue
        if number == 1:  # node
            _node(buf, *value, refs)
        elif number == 5:  # initializer
            _tensor(buf, *value, refs)
        elif number == 15:  # sparse_initializer
            _sparse(buf, *value, refs)


def _node(buf, pos, end, refs):
    for number, wire, value in _fields(buf, pos, end):
        if wire == 2 and number == 5:  # attribute
            _attribute(buf, *value, refs)


def _attribute(buf, pos, end, refs):
    for number, wire, value in _fields(buf, pos, end):
        if wire != 2:
            continue
        if number in (5, 10):  # t, tensors
            _tensor(buf, *value, refs)
        elif number in (6, 11):  # g, graphs
            _graph(buf, *value, refs)
        elif number in (22, 23):  # sparse_tensor, sparse_tensors
            _sparse(buf, *value, refs)


def _sparse(buf, pos, end, refs):
    for number, wire, value in _fields(buf, pos, end):
        if wire == 2 and number in (1, 2):  # values, indices
            _tensor(buf, *value, refs)


def _tensor(buf, pos, end, refs):
    name, entries = "", {}
    for number, wire, value in _fields(buf, pos, end):
        if wire == 2 and number == 8:  # name
            name = _text(buf, *value)
        elif wire == 2 and number == 13:  # external_data: StringStringEntryProto
            key = val = ""
            for n, w, v in _fields(buf, *value):
                if w == 2 and n == 1:
                    key = _text(buf, *v)
                elif w == 2 and n == 2:
                    val = _text(buf, *v)
            entries[key] = val
    if "location" not in entries:
        return
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError as err:
        raise _Malformed(f"tensor {name!r} has a non-integer external-data offset or length ({err})") from None
    refs.append(ExternalData(tensor=name, location=entries["location"], offset=offset, length=length))


def _text(buf, start: int, end: int) -> str:
    try:
        return bytes(buf[start:end]).decode("utf-8")
    except UnicodeDecodeError as err:
        raise _Malformed(f"a string at byte {start} is not UTF-8") from err

"""The engine cache: engines keyed by everything that determines them, stored in the bundle.

Layout::

    BUNDLE/engines/<component>.<key16>.engine   the serialized engine
    BUNDLE/engines/<component>.<key16>.json     its metadata (an `EngineRecord`)

    BUNDLE/engines/<component>.<key16>.verified    when its content hash was last checked (size, times)
    BUNDLE/engines/<component>.<key16>.sm89.runtime-cache   TensorRT-RTX's JIT cache for one GPU kind

The key is the sha256 of an `EngineSpec`: the ONNX file's sha256, the library (target and version),
the target compute capabilities, the resolved optimization profile and the build flags (weights
embedded, refittable or stripped included). Any change gives a new key, so a stale engine is never
picked up, and an identical request finds the engine it built before. Files are written to a
temporary name and moved into place (`os.replace`), engine first, metadata last: an interrupted
build leaves no metadata, hence no cache hit. Engine files get the permissions of the bundle's
manifest (a bundle readable by a group stays readable by it).

An engine is trusted only when its metadata is consistent (the recorded key is its spec's sha256,
the engine file is `engines/<component>.<key16>.engine`) and the engine file's sha256 matches the
one recorded at build time. Hashing a multi-GB engine takes seconds, so the result is remembered
in `<stem>.verified` with the file's size, inode, mtime and ctime: while none of them changes, the
file is not read again (an in-place edit changes mtime and ctime; restoring the mtime by hand still
changes the ctime). A bundle that cannot be written is simply hashed at every check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from latentrt.bundle.manifest import Manifest
from latentrt.errors import BundleError
from latentrt.bundle.writer import atomic_write

log = logging.getLogger(__name__)

ENGINE_DIR = "engines"
KEY_SCHEMA = 2
_HASH_CHUNK = 16 << 20

Status = Literal["current", "stale", "missing"]


@dataclass(frozen=True)
class EngineSpec:
    """Everything that determines an engine; its sha256 is the cache key.

    Attributes:
        component: the manifest's component name.
        onnx_sha256: the manifest's sha256 of the component's ONNX file.
        library: "tensorrt" or "tensorrt-rtx".
        library_version: the library's version string.
        compute_capabilities: the target compute capabilities ("8.6", ...), sorted; empty means the
            library's default (TensorRT-RTX: portable across 8.0, 8.6, 8.9, 12.0).
        profile: the resolved optimization profile (`ComponentProfile.to_dict()`).
        flags: build flags (optimization level, workspace limit, precision, typing).
    """

    component: str
    onnx_sha256: str
    library: str
    library_version: str
    compute_capabilities: tuple[str, ...]
    profile: dict[str, Any]
    flags: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": KEY_SCHEMA,
            "component": self.component,
            "onnx_sha256": self.onnx_sha256,
            "library": self.library,
            "library_version": self.library_version,
            "compute_capabilities": list(self.compute_capabilities),
            "profile": self.profile,
            "flags": self.flags,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineSpec:
        return cls(
            component=d["component"],
            onnx_sha256=d["onnx_sha256"],
            library=d["library"],
            library_version=d["library_version"],
            compute_capabilities=tuple(d["compute_capabilities"]),
            profile=dict(d["profile"]),
            flags=dict(d["flags"]),
        )

    @property
    def key(self) -> str:
        """sha256 (hex) of the canonical JSON of `to_dict()`."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def file_stem(self) -> str:
        return f"{self.component}.{self.key[:16]}"


@dataclass(frozen=True)
class EngineRecord:
    """An engine's metadata JSON: its spec plus what the build produced.

    Attributes:
        spec: what the engine was built from.
        key: `spec.key` at build time.
        engine_file: the engine's path relative to the bundle.
        engine_bytes: the engine file's size.
        engine_sha256: the engine file's sha256.
        build_seconds: time in `build_serialized_network`.
        parse_seconds: time parsing the ONNX model.
        created: UTC time of the build, ISO 8601.
        inputs, outputs: the manifest's tensor specs of the component (as dicts), for the runtime.
        network: what the parser reported: input/output names, dtypes, shapes, layer count.
        memory: device memory the builder reported, in bytes: "activations" and "weights" (and
            "device_persistent" / "host_persistent" where logged), plus "io" (I/O buffers at the
            profile's max shapes, computed from the manifest; None when not computable).
        refit: for refittable / weight-stripped engines: {"mode": "refittable" | "stripped",
            "weights": [{"name", "dtype", "shape"}, ...]}, the ONNX initializers the network holds
            as named weights (what a refit may set), in the ONNX file's order; {} otherwise.
    """

    spec: EngineSpec
    key: str
    engine_file: str
    engine_bytes: int
    engine_sha256: str
    build_seconds: float
    parse_seconds: float = 0.0
    created: str = ""
    inputs: tuple[dict[str, Any], ...] = ()
    outputs: tuple[dict[str, Any], ...] = ()
    network: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    refit: dict[str, Any] = field(default_factory=dict)

    @property
    def component(self) -> str:
        return self.spec.component

    @property
    def weights_mode(self) -> str:
        """"embedded", "refittable" or "stripped" (engines built before the flag existed: "embedded")."""
        return str(self.spec.flags.get("weights", "embedded"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "spec": self.spec.to_dict(),
            "engine_file": self.engine_file,
            "engine_bytes": self.engine_bytes,
            "engine_sha256": self.engine_sha256,
            "build_seconds": self.build_seconds,
            "parse_seconds": self.parse_seconds,
            "created": self.created,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "network": self.network,
            "memory": self.memory,
            "refit": self.refit,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineRecord:
        return cls(
            spec=EngineSpec.from_dict(d["spec"]),
            key=d["key"],
            engine_file=d["engine_file"],
            engine_bytes=int(d["engine_bytes"]),
            engine_sha256=d["engine_sha256"],
            build_seconds=float(d["build_seconds"]),
            parse_seconds=float(d.get("parse_seconds", 0.0)),
            created=d.get("created", ""),
            inputs=tuple(d.get("inputs", ())),
            outputs=tuple(d.get("outputs", ())),
            network=dict(d.get("network", {})),
            memory=dict(d.get("memory") or {}),
            refit=dict(d.get("refit") or {}),
        )


@dataclass(frozen=True)
class EngineStatus:
    """One line of `latentrt inspect`: an engine (or a missing one) and whether it is usable.

    Attributes:
        component: the component name.
        status: "current" (matches the manifest, and the settings if given), "stale" (built from
            another ONNX file or other settings, or its file is damaged) or "missing" (the settings
            ask for an engine that is not built).
        reasons: why it is stale or missing, one phrase each.
        record: the engine's metadata (None when missing).
        path: the engine file (the path it would have when missing).
    """

    component: str
    status: Status
    reasons: tuple[str, ...]
    record: EngineRecord | None
    path: Path


def engine_dir(bundle: str | os.PathLike) -> Path:
    return Path(bundle) / ENGINE_DIR


def engine_paths(bundle: str | os.PathLike, spec: EngineSpec) -> tuple[Path, Path]:
    """(engine file, metadata file) for `spec`."""
    base = engine_dir(bundle) / spec.file_stem
    return base.with_name(base.name + ".engine"), base.with_name(base.name + ".json")


def runtime_cache_path(bundle: str | os.PathLike, record: EngineRecord, compute_capability: str) -> Path:
    """Where TensorRT-RTX's runtime (JIT) cache of `record`'s engine lives for GPUs of `compute_capability`."""
    return engine_dir(bundle) / f"{record.spec.file_stem}.sm{compute_capability.replace('.', '')}.runtime-cache"


def find_engine(bundle: str | os.PathLike, spec: EngineSpec) -> EngineRecord | None:
    """The cached engine for `spec`, or None when there is none or it is damaged.

    A hit needs the metadata file with the same key (and consistent with its own spec), and the
    engine file with the recorded size and sha256 (`check_engine_file`).
    """
    _, meta = engine_paths(bundle, spec)
    if not meta.is_file():
        return None
    record = _read_record(meta)
    if record is None or record.key != spec.key:
        return None
    problem = check_record(record) or check_engine_file(bundle, record)
    if problem:
        log.info("engine %s is not usable (%s); it will be rebuilt", record.engine_file, problem)
        return None
    return record


def check_record(record: EngineRecord) -> str | None:
    """Why `record`'s metadata cannot be trusted (its key is not its spec's, or it names another
    file than its own), or None."""
    if record.key != record.spec.key:
        return f"its metadata's key {record.key[:16]}... is not the sha256 of its spec ({record.spec.key[:16]}...): the metadata was edited or damaged"
    expected = f"{ENGINE_DIR}/{record.spec.file_stem}.engine"
    if record.engine_file != expected:
        return f"its metadata names engine file {record.engine_file!r}, expected {expected!r}"
    return None


def check_engine_file(bundle: str | os.PathLike, record: EngineRecord, *, verify: bool = True) -> str | None:
    """Why `record`'s engine file is not the one that was built (missing, other size, other sha256), or None.

    The sha256 is computed only when the file changed since it was last verified (see the module
    docstring); `verify=False` checks presence and size only.
    """
    path = Path(bundle) / record.engine_file
    try:
        stat = path.stat()
    except OSError:
        return f"engine file {record.engine_file} is missing"
    if not path.is_file():
        return f"engine file {record.engine_file} is not a file"
    if stat.st_size != record.engine_bytes:
        return f"engine file {record.engine_file} has {stat.st_size} bytes, the metadata records {record.engine_bytes}"
    if not verify:
        return None
    stamp_path = path.with_suffix(".verified")
    stamp = _stamp(stat, record.engine_sha256)
    try:
        if json.loads(stamp_path.read_text()) == stamp:
            return None
    except (OSError, ValueError):
        pass
    digest = sha256_of(path)
    if digest != record.engine_sha256:
        return f"engine file {record.engine_file} was modified since the build (sha256 {digest[:12]}..., the metadata records {record.engine_sha256[:12]}...)"
    _write_stamp(stamp_path, stamp, Path(bundle))
    return None


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(stat: os.stat_result, sha256: str) -> dict[str, Any]:
    return {"size": stat.st_size, "inode": stat.st_ino, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "sha256": sha256}


def _write_stamp(path: Path, stamp: dict[str, Any], bundle: Path) -> None:
    try:
        atomic_write(path, (json.dumps(stamp) + "\n").encode())
        apply_bundle_mode(path, bundle)
    except OSError as err:  # a read-only bundle: hash again next time
        log.debug("cannot record the verification of %s (%s)", path, err)


def bundle_file_mode(bundle: str | os.PathLike) -> int:
    """The permission bits the bundle's files have (its manifest's), for files written into it later."""
    try:
        return (Path(bundle) / "manifest.json").stat().st_mode & 0o666
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def apply_bundle_mode(path: Path, bundle: str | os.PathLike) -> None:
    """Give `path` (an engine, its metadata, a cache) the bundle's file permissions."""
    path.chmod(bundle_file_mode(bundle))


def write_bundle_file(bundle: str | os.PathLike, path: Path, data: Any) -> None:
    """Write `data` atomically to `path` inside `bundle`, with the bundle's file permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, memoryview(data).cast("B"))
    apply_bundle_mode(path, bundle)


def write_engine(
    bundle: str | os.PathLike,
    spec: EngineSpec,
    data: Any,
    *,
    build_seconds: float,
    parse_seconds: float = 0.0,
    inputs: Iterable[Mapping[str, Any]] = (),
    outputs: Iterable[Mapping[str, Any]] = (),
    network: Mapping[str, Any] | None = None,
    created: str = "",
    memory: Mapping[str, Any] | None = None,
    refit: Mapping[str, Any] | None = None,
) -> EngineRecord:
    """Store a serialized engine (`data`: bytes or any buffer, e.g. TensorRT's IHostMemory) and its metadata.

    Both files are written atomically, the engine first, with the bundle's file permissions; the
    engine's verification stamp is written with them (its sha256 is computed here anyway).
    """
    engine, meta = engine_paths(bundle, spec)
    if not engine.parent.exists():
        engine.parent.mkdir(parents=True)
        engine.parent.chmod(Path(bundle).stat().st_mode & 0o777)
    view = memoryview(data).cast("B")
    atomic_write(engine, view)
    apply_bundle_mode(engine, bundle)
    record = EngineRecord(
        spec=spec,
        key=spec.key,
        engine_file=engine.relative_to(Path(bundle)).as_posix(),
        engine_bytes=view.nbytes,
        engine_sha256=hashlib.sha256(view).hexdigest(),
        build_seconds=float(build_seconds),
        parse_seconds=float(parse_seconds),
        created=created,
        inputs=tuple(dict(i) for i in inputs),
        outputs=tuple(dict(o) for o in outputs),
        network=dict(network or {}),
        memory=dict(memory or {}),
        refit=dict(refit or {}),
    )
    _write_stamp(engine.with_suffix(".verified"), _stamp(engine.stat(), record.engine_sha256), Path(bundle))
    write_bundle_file(bundle, meta, (json.dumps(record.to_dict(), indent=2) + "\n").encode())
    return record


def read_records(bundle: str | os.PathLike) -> list[EngineRecord]:
    """Every engine's metadata in `BUNDLE/engines`, sorted by component and creation time."""
    folder = engine_dir(bundle)
    if not folder.is_dir():
        return []
    records = [r for r in (_read_record(p) for p in sorted(folder.glob("*.json"))) if r is not None]
    return sorted(records, key=lambda r: (r.component, r.created))


def list_engines(
    bundle: str | os.PathLike,
    manifest: Manifest,
    expected: Mapping[str, EngineSpec] | None = None,
    *,
    verify: bool = True,
) -> list[EngineStatus]:
    """Every engine in the bundle, current or stale against `manifest` (and `expected`, if given).

    An engine is stale when it was built from another ONNX file, its metadata is inconsistent,
    or its file is missing, truncated or modified (sha256; see `check_engine_file`).

    Args:
        manifest: the bundle's present manifest; an engine built from another ONNX file is stale.
        expected: the specs the present build settings would produce, per component; an engine
            of that component with another key is stale (the reasons name the fields that differ),
            and a component with no engine of that key is reported "missing".
        verify: check each engine file's sha256 (cached by size and times); False checks the size only.
    """
    bundle = Path(bundle)
    statuses = []
    current_keys = set()
    for record in read_records(bundle):
        reasons = []
        comp = manifest.components.get(record.component)
        if comp is None:
            reasons.append(f"component {record.component!r} is no longer in the manifest")
        elif comp.sha256 != record.spec.onnx_sha256:
            reasons.append(f"the ONNX file changed since the build (sha256 {record.spec.onnx_sha256[:12]}... -> {comp.sha256[:12]}...)")
        inconsistent = check_record(record)
        path = engine_paths(bundle, record.spec)[0] if inconsistent else bundle / record.engine_file
        problem = inconsistent or check_engine_file(bundle, record, verify=verify)
        if problem:
            reasons.append(problem)
        if expected is not None and record.component in expected and record.key != expected[record.component].key:
            changes = spec_differences(record.spec, expected[record.component])
            reasons.append("built with other settings: " + "; ".join(changes))
        if not reasons:
            current_keys.add(record.key)
        statuses.append(EngineStatus(record.component, "stale" if reasons else "current", tuple(reasons), record, path))
    for name, spec in (expected or {}).items():
        if spec.key not in current_keys:
            path, _ = engine_paths(bundle, spec)
            statuses.append(EngineStatus(name, "missing", ("no engine was built with these settings",), None, path))
    return statuses


def spec_differences(old: EngineSpec, new: EngineSpec) -> list[str]:
    """Human-readable changes between two specs: "flags.opt_level: 3 -> 0"."""
    before, after = _flatten(old.to_dict()), _flatten(new.to_dict())
    changes = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            changes.append(f"{key}: {before.get(key, '(none)')} -> {after.get(key, '(none)')}")
    return changes


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _read_record(path: Path) -> EngineRecord | None:
    try:
        return EngineRecord.from_dict(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        log.warning("ignoring unreadable engine metadata %s (%s)", path, err)
        return None


def load_record(path: str | os.PathLike) -> EngineRecord:
    """Read one engine's metadata JSON.

    Raises:
        BundleError: the file is missing or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"engine metadata {path} is missing; rebuild the engine with `latentrt build`")
    record = _read_record(path)
    if record is None:
        raise BundleError(f"engine metadata {path} is malformed; rebuild the engine with `latentrt build`")
    return record

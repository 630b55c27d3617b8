"""The engine cache: engines keyed by everything that determines them, stored in the bundle.

Layout::

    BUNDLE/engines/<component>.<key16>.engine   the serialized engine
    BUNDLE/engines/<component>.<key16>.json     its metadata (an `EngineRecord`)

The key is the sha256 of an `EngineSpec`: the ONNX file's sha256, the library (target and version),
the target compute capabilities, the resolved optimization profile and the build flags. Any change
gives a new key, so a stale engine is never picked up, and an identical request finds the engine it
built before. Files are written to a temporary name and moved into place (`os.replace`), engine
first, metadata last: an interrupted build leaves no metadata, hence no cache hit.
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

from latentrt.errors import BundleError
from latentrt.bundle.manifest import Manifest
from latentrt.bundle.writer import atomic_write

log = logging.getLogger(__name__)

ENGINE_DIR = "engines"
KEY_SCHEMA = 1

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

    @property
    def component(self) -> str:
        return self.spec.component

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


def find_engine(bundle: str | os.PathLike, spec: EngineSpec) -> EngineRecord | None:
    """The cached engine for `spec`, or None when there is none or it is damaged.

    A hit needs the metadata file with the same key and the engine file with the recorded size.
    """
    engine, meta = engine_paths(bundle, spec)
    if not meta.is_file():
        return None
    record = _read_record(meta)
    if record is None or record.key != spec.key:
        return None
    if not engine.is_file() or engine.stat().st_size != record.engine_bytes:
        log.info("engine %s is missing or truncated; it will be rebuilt", engine)
        return None
    return record


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
) -> EngineRecord:
    """Store a serialized engine (`data`: bytes or any buffer, e.g. TensorRT's IHostMemory) and its metadata.

    Both files are written atomically, the engine first.
    """
    engine, meta = engine_paths(bundle, spec)
    engine.parent.mkdir(parents=True, exist_ok=True)
    view = memoryview(data).cast("B")
    atomic_write(engine, view)
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
    )
    atomic_write(meta, (json.dumps(record.to_dict(), indent=2) + "\n").encode())
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
) -> list[EngineStatus]:
    """Every engine in the bundle, current or stale against `manifest` (and `expected`, if given).

    Args:
        manifest: the bundle's present manifest; an engine built from another ONNX file is stale.
        expected: the specs the present build settings would produce, per component; an engine
            of that component with another key is stale (the reasons name the fields that differ),
            and a component with no engine of that key is reported "missing".
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
        path = bundle / record.engine_file
        if not path.is_file():
            reasons.append(f"engine file {record.engine_file} is missing")
        elif path.stat().st_size != record.engine_bytes:
            reasons.append(f"engine file {record.engine_file} has {path.stat().st_size} bytes, the metadata records {record.engine_bytes}")
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

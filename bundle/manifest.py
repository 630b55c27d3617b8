"""The bundle manifest: what a C++ or Python stack needs to run an exported pipeline.

A bundle is a directory::

    BUNDLE/
      manifest.json
      onnx/<component>.onnx (+ <component>.onnx.data when a model exceeds 2 GB)
      tokenizer*/tokenizer.json
      engines/ (TensorRT engines, written by `latentrt build`)

`manifest.json` is the single source of truth. It is built from the frozen dataclasses below and
round-trips through JSON (`Manifest.from_dict(m.to_dict()) == m`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from latentrt.bundle.paths import onnx_external_data, resolve_inside
from latentrt.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of an ONNX component.

    `shape` holds ints for fixed dimensions and axis names (str) for dynamic ones; every axis
    name has a valid range in the component's `axes`.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))


@dataclass(frozen=True)
class AxisRange:
    """Valid sizes of a named dynamic axis: `min <= size <= max`, `size % multiple_of == 0`.

    `opt` is the size an optimization profile should be tuned for.
    """

    min: int
    opt: int
    max: int
    multiple_of: int = 1

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise BundleError(f"axis range needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    def contains(self, size: int) -> bool:
        return self.min <= size <= self.max and size % self.multiple_of == 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AxisRange:
        return cls(**d)


@dataclass(frozen=True)
class Validation:
    """One numerical comparison of the ONNX model against PyTorch on one set of input shapes."""

    shapes: dict[str, tuple[int, ...]]
    rel_l2: dict[str, float]
    max_abs: dict[str, float]
    backend: str = "onnxruntime-cpu"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Validation:
        return cls(
            shapes={k: tuple(v) for k, v in d["shapes"].items()},
            rel_l2=dict(d["rel_l2"]),
            max_abs=dict(d["max_abs"]),
            backend=d.get("backend", "onnxruntime-cpu"),
        )


@dataclass(frozen=True)
class Component:
    """One exported model of the pipeline (a text encoder, the denoiser or the VAE decoder)."""

    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: dict[str, AxisRange]
    precision: str = "fp32"
    opset: int = 18
    external_data: tuple[str, ...] = ()
    validation: tuple[Validation, ...] = ()
    # fp16/bf16: what the precision pass kept in fp32 and why (export/precision.py's PrecisionReport).
    precision_report: dict[str, Any] = field(default_factory=dict)
    # sha256 of each external data file, in the order of `external_data` (computed while writing).
    external_sha256: tuple[str, ...] = ()
    # initializer -> how it is made of the checkpoint's tensors: {"parts": [[tensor, ""|"T"], ...],
    # "shape": [...], "axis": k} (parts concatenated along `axis`; "T" transposed). The map from a
    # model parameter to the ONNX weight that holds it, for LoRA (export/weights.py's Recipe).
    weights: dict[str, Any] = field(default_factory=dict)

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Component:
        return cls(
            file=d["file"],
            sha256=d["sha256"],
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            axes={k: AxisRange.from_dict(v) for k, v in d["axes"].items()},
            precision=d.get("precision", "fp32"),
            opset=d.get("opset", 18),
            external_data=tuple(d.get("external_data", ())),
            validation=tuple(Validation.from_dict(v) for v in d.get("validation", ())),
            precision_report=d.get("precision_report", {}),
            external_sha256=tuple(d.get("external_sha256", ())),
            weights=d.get("weights", {}),
        )


@dataclass(frozen=True)
class TokenizerSpec:
    """A tokenizer.json and how prompts are padded/truncated for its text encoder."""

    file: str
    max_length: int
    pad_id: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerSpec:
        return cls(**d)


@dataclass(frozen=True)
class LatentSpec:
    """The denoiser's latent space and how the VAE decoder reads it.

    The decoder's input is `latents / scaling_factor + shift_factor`.
    """

    channels: int
    vae_scale_factor: int
    scaling_factor: float
    shift_factor: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatentSpec:
        return cls(**d)


@dataclass(frozen=True)
class Defaults:
    """Generation defaults: what diffusers' pipeline would use for this model."""

    height: int
    width: int
    num_inference_steps: int = 28
    guidance_scale: float = 7.0
    max_sequence_length: int = 256

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Defaults:
        return cls(**d)


@dataclass(frozen=True)
class Manifest:
    """Everything a runtime needs to know about a bundle.

    `family` selects how prompts become the denoiser's conditioning (runtime/families/__init__.py), with the
    family's parameters in `conditioning` (which encoder feeds which input, widths);
    `scheduler` is the diffusers scheduler class name and its config.
    """

    family: str
    components: dict[str, Component]
    tokenizers: dict[str, TokenizerSpec]
    latent: LatentSpec
    scheduler: dict[str, Any]
    defaults: Defaults
    conditioning: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    latentrt_version: str = ""
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        return cls(
            family=d["family"],
            components={k: Component.from_dict(v) for k, v in d["components"].items()},
            tokenizers={k: TokenizerSpec.from_dict(v) for k, v in d["tokenizers"].items()},
            latent=LatentSpec.from_dict(d["latent"]),
            scheduler=d["scheduler"],
            defaults=Defaults.from_dict(d["defaults"]),
            conditioning=d.get("conditioning", {}),
            source=d.get("source", ""),
            latentrt_version=d.get("latentrt_version", ""),
            schema_version=d["schema_version"],
            extra=d.get("extra", {}),
        )

    def save(self, bundle: str | os.PathLike) -> None:
        path = Path(bundle) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def jsonable(obj: Any) -> Any:
    """Dicts with str keys and lists all the way down (tuples become lists), as JSON reads them back."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(bundle: str | os.PathLike, *, verify: bool = True) -> Manifest:
    """Read `BUNDLE/manifest.json`, check its structure and every path it names, and (by default)
    every ONNX file's sha256.

    Whatever `verify` says, the manifest's structure is checked field by field (types and ranges)
    and every path the bundle names (components, their external data, tokenizers, and the
    external-data locations inside each ONNX file) must resolve inside the bundle after symbolic
    links, before any of those files is opened.

    Raises:
        BundleError: the directory or manifest is missing, unreadable, from an unknown schema,
            malformed, names a path outside the bundle, or a file is missing or does not match its
            recorded sha256.
    """
    bundle = Path(bundle)
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise BundleError(f"bundle {bundle} does not exist or is not a directory; create one with `latentrt export`")
    resolve_inside(bundle, MANIFEST_NAME, "the manifest")
    if not path.is_file():
        raise BundleError(f"{bundle} has no {MANIFEST_NAME}; is it a latentrt bundle? Re-export it with `latentrt export`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise BundleError(f"{path} is not valid JSON ({err}); the bundle is corrupt, re-export it") from err
    if not isinstance(raw, dict) or type(raw.get("schema_version")) is not int:
        raise BundleError(f"{path} has no integer 'schema_version'; the bundle is corrupt, re-export it")
    if raw["schema_version"] > SCHEMA_VERSION:
        raise BundleError(
            f"{path} has schema version {raw['schema_version']}, newer than this latentrt understands "
            f"({SCHEMA_VERSION}); upgrade latentrt"
        )
    if raw["schema_version"] < 1:
        raise BundleError(
            f"{path} has schema version {raw['schema_version']}, which no latentrt ever wrote (versions start at 1); "
            "the bundle is corrupt, re-export it"
        )
    check_manifest_dict(raw, where=str(path))
    try:
        manifest = Manifest.from_dict(raw)
    except (KeyError, TypeError, ValueError, BundleError) as err:
        raise BundleError(f"{path} is missing or has a malformed field ({err!r}); the bundle is corrupt, re-export it") from err
    check_paths(bundle, manifest)
    if verify:
        verify_files(bundle, manifest)
    check_external_data(bundle, manifest)
    return manifest


def check_paths(bundle: str | os.PathLike, manifest: Manifest) -> dict[str, Path]:
    """Every file the manifest names, resolved: each must lie inside the bundle (after symbolic links)
    and exist as a regular file. Nothing is opened. Returns {relative path: real path}.

    Raises:
        BundleError: a path leaves the bundle, or a file is missing.
    """
    resolved: dict[str, Path] = {}
    for name, comp in manifest.components.items():
        path = resolve_inside(bundle, comp.file, f"component {name!r} file")
        if not path.is_file():
            raise BundleError(f"component {name!r}: {Path(bundle) / comp.file} is missing; re-export the bundle")
        resolved[comp.file] = path
        for data in comp.external_data:
            data_path = resolve_inside(bundle, data, f"component {name!r} external data")
            if not data_path.is_file():
                raise BundleError(f"component {name!r}: external data file {Path(bundle) / data} is missing; re-export the bundle")
            resolved[data] = data_path
    for name, tok in manifest.tokenizers.items():
        path = resolve_inside(bundle, tok.file, f"tokenizer {name!r} file")
        if not path.is_file():
            raise BundleError(f"tokenizer {name!r}: {Path(bundle) / tok.file} is missing; re-export the bundle")
        resolved[tok.file] = path
    return resolved


def check_external_data(bundle: str | os.PathLike, manifest: Manifest) -> None:
    """Check the external-data references inside each component's ONNX file without loading it:
    each location must resolve inside the bundle and the file must hold every referenced byte range
    (a truncated data file is caught here, not by ONNX Runtime halfway through a load).

    Raises:
        BundleError: a reference leaves the bundle, names a missing file, or runs past its end.
    """
    root = Path(bundle)
    for name, comp in manifest.components.items():
        onnx_path = resolve_inside(root, comp.file, f"component {name!r} file")
        folder = onnx_path.parent  # ONNX Runtime reads external data relative to the model's folder
        sizes: dict[Path, int] = {}
        for ref in onnx_external_data(onnx_path):
            what = f"component {name!r}: tensor {ref.tensor!r}'s external data"
            data = resolve_inside(folder, ref.location, what)
            if not data.is_relative_to(root.resolve()):
                raise BundleError(f"{what} {ref.location!r} resolves to {data}, outside the bundle; re-export the bundle")
            if data not in sizes:
                if not data.is_file():
                    raise BundleError(f"{what} file {data} is missing; re-export the bundle")
                sizes[data] = data.stat().st_size
            end = ref.offset + (ref.length or 0)
            if ref.offset < 0 or end > sizes[data]:
                raise BundleError(
                    f"{what} needs bytes {ref.offset}..{end} of {data}, which has {sizes[data]}; "
                    "the data file is truncated: re-export the bundle"
                )


def verify_files(bundle: str | os.PathLike, manifest: Manifest) -> None:
    """Check that every component's ONNX file lies inside the bundle, exists and matches the
    manifest's sha256 (external data files: inside the bundle and present; they are not hashed)."""
    bundle = Path(bundle)
    resolved = check_paths(bundle, manifest)
    for name, comp in manifest.components.items():
        path = resolved[comp.file]
        actual = sha256_file(path)
        if actual != comp.sha256:
            raise BundleError(
                f"component {name!r}: {bundle / comp.file} has sha256 {actual[:12]}..., the manifest records {comp.sha256[:12]}...; "
                "the file was modified or truncated after export: re-export the bundle"
            )


# Structural checks of the raw JSON, before any dataclass is built: each error names the field's path.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_manifest_dict(raw: Any, *, where: str = MANIFEST_NAME) -> None:
    """Check a manifest's JSON structure field by field: types, ranges, and cross references (every
    named axis of a tensor shape has a range). Unknown extra keys are allowed.

    Raises:
        BundleError: naming the first bad field (`components.transformer.axes.batch.multiple_of`),
            what it holds and what is expected.
    """
    c = _Checker(where)
    c.obj(raw, "")
    c.integer(raw, "schema_version", lo=1, hi=SCHEMA_VERSION)
    c.string(raw, "family", nonempty=True)
    for key in ("source", "latentrt_version"):
        c.string(raw, key, optional=True)
    for key in ("conditioning", "extra"):
        c.obj(raw.get(key, {}), key)
    scheduler = c.obj(raw.get("scheduler"), "scheduler")
    c.string(scheduler, "class_name", nonempty=True, at="scheduler")
    c.obj(scheduler.get("config", {}), "scheduler.config")

    components = c.obj(raw.get("components"), "components")
    if not components:
        c.fail("components", components, "at least one component")
    for name, comp in components.items():
        at = f"components.{name}"
        c.name(name, at)
        c.obj(comp, at)
        c.string(comp, "file", nonempty=True, at=at)
        sha = comp.get("sha256")
        if not (isinstance(sha, str) and _SHA256.match(sha)):
            c.fail(f"{at}.sha256", sha, "64 lowercase hexadecimal digits")
        axes = c.obj(comp.get("axes"), f"{at}.axes")
        for axis, rng in axes.items():
            ax = f"{at}.axes.{axis}"
            c.name(axis, ax)
            c.obj(rng, ax)
            for key in ("min", "opt", "max"):
                c.integer(rng, key, lo=1, at=ax)
            c.integer(rng, "multiple_of", lo=1, optional=True, at=ax)
            if not rng["min"] <= rng["opt"] <= rng["max"]:
                c.fail(ax, {k: rng[k] for k in ("min", "opt", "max")}, "min <= opt <= max")
        for kind in ("inputs", "outputs"):
            specs = c.array(comp.get(kind), f"{at}.{kind}")
            if not specs:
                c.fail(f"{at}.{kind}", specs, "at least one tensor")
            for i, spec in enumerate(specs):
                sp = f"{at}.{kind}[{i}]"
                c.obj(spec, sp)
                c.string(spec, "name", nonempty=True, at=sp)
                c.string(spec, "dtype", nonempty=True, at=sp)
                for j, dim in enumerate(c.array(spec.get("shape"), f"{sp}.shape")):
                    if isinstance(dim, str):
                        if kind == "inputs" and dim not in axes:  # outputs may name derived axes ("height")
                            c.fail(f"{sp}.shape[{j}]", dim, f"a size or one of the component's axes ({', '.join(axes) or 'none'})")
                    elif type(dim) is not int or dim < 0:
                        c.fail(f"{sp}.shape[{j}]", dim, "an integer >= 0 or an axis name")
        c.string(comp, "precision", nonempty=True, optional=True, at=at)
        c.integer(comp, "opset", lo=1, optional=True, at=at)
        for j, data in enumerate(c.array(comp.get("external_data", []), f"{at}.external_data")):
            if not isinstance(data, str) or not data:
                c.fail(f"{at}.external_data[{j}]", data, "a path relative to the bundle")
        for j, val in enumerate(c.array(comp.get("validation", []), f"{at}.validation")):
            vp = f"{at}.validation[{j}]"
            c.obj(val, vp)
            for key in ("shapes", "rel_l2", "max_abs"):
                c.obj(val.get(key), f"{vp}.{key}")
        c.obj(comp.get("precision_report", {}), f"{at}.precision_report")
        hashes = c.array(comp.get("external_sha256", []), f"{at}.external_sha256")
        if hashes and len(hashes) != len(comp.get("external_data", [])):
            c.fail(f"{at}.external_sha256", hashes, "one sha256 per external data file")
        for j, digest in enumerate(hashes):
            if not (isinstance(digest, str) and len(digest) == 64):
                c.fail(f"{at}.external_sha256[{j}]", digest, "a sha256 in hex")
        for name, recipe in c.obj(comp.get("weights", {}), f"{at}.weights").items():
            wp = f"{at}.weights.{name}"
            c.obj(recipe, wp)
            for j, part in enumerate(c.array(recipe.get("parts"), f"{wp}.parts")):
                if not (isinstance(part, list) and len(part) == 2 and isinstance(part[0], str) and part[1] in ("", "T")):
                    c.fail(f"{wp}.parts[{j}]", part, "[tensor name, '' or 'T']")

    tokenizers = c.obj(raw.get("tokenizers"), "tokenizers")
    for name, tok in tokenizers.items():
        at = f"tokenizers.{name}"
        c.name(name, at)
        c.obj(tok, at)
        c.string(tok, "file", nonempty=True, at=at)
        c.integer(tok, "max_length", lo=0, at=at)
        c.integer(tok, "pad_id", lo=0, at=at)

    latent = c.obj(raw.get("latent"), "latent")
    c.integer(latent, "channels", lo=1, at="latent")
    c.integer(latent, "vae_scale_factor", lo=1, at="latent")
    c.number(latent, "scaling_factor", nonzero=True, at="latent")
    c.number(latent, "shift_factor", optional=True, at="latent")

    defaults = c.obj(raw.get("defaults"), "defaults")
    c.integer(defaults, "height", lo=1, at="defaults")
    c.integer(defaults, "width", lo=1, at="defaults")
    c.integer(defaults, "num_inference_steps", lo=1, optional=True, at="defaults")
    c.number(defaults, "guidance_scale", optional=True, at="defaults")
    c.integer(defaults, "max_sequence_length", lo=0, optional=True, at="defaults")


class _Checker:
    """Typed field access over the raw JSON; `fail` raises a BundleError naming the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field: str, value: Any, expected: str) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise BundleError(
            f"{self.where}: field {field or '(top level)'!r} is missing or malformed: got {shown}, expected {expected}; the manifest is corrupt "
            "or hand-edited: re-export the bundle"
        )

    def obj(self, value: Any, field: str) -> dict:
        if not isinstance(value, dict):
            self.fail(field, value, "a JSON object")
        return value

    def array(self, value: Any, field: str) -> list:
        if not isinstance(value, list):
            self.fail(field, value, "a JSON array")
        return value

    def name(self, key: str, field: str) -> None:
        if not _NAME.match(key):
            self.fail(field, key, "a name of letters, digits, '_', '.' or '-' not starting with '.' or '-'")

    def _get(self, d: dict, key: str, optional: bool, at: str) -> tuple[bool, Any, str]:
        field = f"{at}.{key}" if at else key
        if key not in d:
            if not optional:
                self.fail(field, "(missing)", "a value")
            return False, None, field
        return True, d[key], field

    def string(self, d: dict, key: str, *, nonempty: bool = False, optional: bool = False, at: str = "") -> None:
        present, value, field = self._get(d, key, optional, at)
        if present and (not isinstance(value, str) or (nonempty and not value)):
            self.fail(field, value, "a non-empty string" if nonempty else "a string")

    def integer(self, d: dict, key: str, *, lo: int | None = None, hi: int | None = None, optional: bool = False, at: str = "") -> None:
        present, value, field = self._get(d, key, optional, at)
        if present and (type(value) is not int or (lo is not None and value < lo) or (hi is not None and value > hi)):
            bounds = " ".join(p for p in (f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else "") if p)
            self.fail(field, value, f"an integer {bounds}".strip())

    def number(self, d: dict, key: str, *, nonzero: bool = False, optional: bool = False, at: str = "") -> None:
        present, value, field = self._get(d, key, optional, at)
        if present and (type(value) not in (int, float) or not math.isfinite(value) or (nonzero and value == 0)):
            self.fail(field, value, "a finite non-zero number" if nonzero else "a finite number")

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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    """Read `BUNDLE/manifest.json`, check its schema, and (by default) every ONNX file's sha256.

    Raises:
        BundleError: the directory or manifest is missing, unreadable, from a newer schema, or a
            file is missing or does not match its recorded sha256.
    """
    bundle = Path(bundle)
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise BundleError(f"bundle {bundle} does not exist or is not a directory; create one with `latentrt export`")
    if not path.is_file():
        raise BundleError(f"{bundle} has no {MANIFEST_NAME}; is it a latentrt bundle? Re-export it with `latentrt export`")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{path} is not valid JSON ({err}); the bundle is corrupt, re-export it") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("schema_version"), int):
        raise BundleError(f"{path} has no integer 'schema_version'; the bundle is corrupt, re-export it")
    if raw["schema_version"] > SCHEMA_VERSION:
        raise BundleError(
            f"{path} has schema version {raw['schema_version']}, newer than this latentrt understands "
            f"({SCHEMA_VERSION}); upgrade latentrt"
        )
    try:
        manifest = Manifest.from_dict(raw)
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{path} is missing or has a malformed field ({err!r}); the bundle is corrupt, re-export it") from err
    if verify:
        verify_files(bundle, manifest)
    return manifest


def verify_files(bundle: str | os.PathLike, manifest: Manifest) -> None:
    """Check that every component's ONNX file exists and matches the manifest's sha256."""
    bundle = Path(bundle)
    for name, comp in manifest.components.items():
        path = bundle / comp.file
        if not path.is_file():
            raise BundleError(f"component {name!r}: {path} is missing; re-export the bundle")
        actual = sha256_file(path)
        if actual != comp.sha256:
            raise BundleError(
                f"component {name!r}: {path} has sha256 {actual[:12]}..., the manifest records {comp.sha256[:12]}...; "
                "the file was modified or truncated after export: re-export the bundle"
            )
        for data in comp.external_data:
            if not (bundle / data).is_file():
                raise BundleError(f"component {name!r}: external data file {bundle / data} is missing; re-export the bundle")
    for name, tok in manifest.tokenizers.items():
        if not (bundle / tok.file).is_file():
            raise BundleError(f"tokenizer {name!r}: {bundle / tok.file} is missing; re-export the bundle")

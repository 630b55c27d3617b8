"""The bundle format: what every stage of latentrt reads or writes, and which imports none of them.

- `manifest`: the manifest schema (frozen dataclasses that round-trip through JSON), reading it,
  verifying the files it names;
- `writer`: writing a bundle (or one file) atomically.
"""

from latentrt.bundle.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    AxisRange,
    Component,
    Defaults,
    LatentSpec,
    Manifest,
    TensorSpec,
    TokenizerSpec,
    Validation,
    load_manifest,
    sha256_file,
    verify_files,
)
from latentrt.bundle.writer import atomic_write, check_output_dir, writing_bundle

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "AxisRange",
    "Component",
    "Defaults",
    "LatentSpec",
    "Manifest",
    "TensorSpec",
    "TokenizerSpec",
    "Validation",
    "atomic_write",
    "check_output_dir",
    "load_manifest",
    "sha256_file",
    "verify_files",
    "writing_bundle",
]

"""The bundle format: what every stage of latentrt reads or writes, and which imports none of them.

- `manifest`: the manifest schema (frozen dataclasses that round-trip through JSON), reading it
  (structure checked field by field), verifying the files it names;
- `paths`: every path a bundle names must resolve inside it (after symbolic links), ONNX external
  data included;
- `writer`: writing a bundle (or one file) atomically, recovering what a killed writer left, and
  refusing outputs that overlap an input.
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
    check_manifest_dict,
    check_paths,
    load_manifest,
    sha256_file,
    verify_files,
)
from latentrt.bundle.paths import onnx_external_data, resolve_inside
from latentrt.bundle.writer import atomic_write, check_disjoint, check_output_dir, recover_leftovers, writing_bundle

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
    "check_disjoint",
    "check_manifest_dict",
    "check_output_dir",
    "check_paths",
    "load_manifest",
    "onnx_external_data",
    "recover_leftovers",
    "resolve_inside",
    "sha256_file",
    "verify_files",
    "writing_bundle",
]

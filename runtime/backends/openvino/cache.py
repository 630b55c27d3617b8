"""Where OpenVINO keeps a component's compiled model: a folder in the bundle keyed like the engines.

Layout::

    BUNDLE/engines/openvino/<component>.<key16>/           OpenVINO's CACHE_DIR for this component
    BUNDLE/engines/openvino/<component>.<key16>/spec.json  what the key was computed from

The key is the sha256 of a `CompiledModelSpec`: the ONNX file's sha256 (from the manifest), the
OpenVINO version, the inference precision asked for, the CPU (model name and the instruction sets
that change the compiled kernels) and how Q/DQ pairs are compiled. Any change gives a new folder, so a
model compiled for another CPU or precision is never picked up; OpenVINO checks its own blobs
within the folder as well. `latentrt build`'s engines live beside it (`engines/<component>.<key>.engine`)
and never look into this folder.

A bundle that cannot be written (read-only, full disk) gets no cache: the model is compiled at each
load, and the reason is logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from latentrt.bundle.writer import atomic_write
from latentrt.errors import InputError

log = logging.getLogger(__name__)

CACHE_DIR = os.path.join("engines", "openvino")
KEY_SCHEMA = 1


@dataclass(frozen=True)
class CompiledModelSpec:
    """Everything that determines a compiled model; its sha256 is the cache key.

    Attributes:
        component: the manifest's component name.
        onnx_sha256: the manifest's sha256 of the component's ONNX file.
        library_version: `openvino.__version__`.
        precision: the inference precision asked for ("bf16" or "f32").
        cpu: the CPU's model name.
        isa: the CPU's matrix instruction sets (sorted flags: avx2, avx512f, avx512_bf16, amx_bf16, ...).
        int8: how Q/DQ pairs are compiled: "kernels" (int8 kernels) or "exact" (in float).
    """

    component: str
    onnx_sha256: str
    library_version: str
    precision: str
    cpu: str
    isa: tuple[str, ...]
    int8: str = "kernels"

    def to_dict(self) -> dict:
        return {"schema": KEY_SCHEMA, **asdict(self), "isa": list(self.isa)}

    @property
    def key(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def folder(self, bundle: str | os.PathLike) -> Path:
        return Path(bundle) / CACHE_DIR / f"{self.component}.{self.key[:16]}"


def cache_folder(bundle: str | os.PathLike, spec: CompiledModelSpec) -> Path | None:
    """The folder for `spec`'s compiled model, created with its `spec.json`; None (logged) when the
    bundle cannot be written."""
    folder = spec.folder(bundle)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "spec.json").is_file():
            atomic_write(folder / "spec.json", (json.dumps(spec.to_dict(), indent=2) + "\n").encode())
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"{folder} is not writable")
    except (OSError, InputError) as err:
        log.info("%s: no compiled-model cache (%s); OpenVINO compiles at every load", spec.component, err)
        return None
    return folder

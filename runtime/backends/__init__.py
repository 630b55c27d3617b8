"""Backends: each turns a bundle's components into engines (runtime/engine.py's protocol).

One folder per backend, each with a `load_engines(bundle, manifest, options)`; the library behind
it (onnxruntime, tensorrt, ...) is imported only when that backend is loaded.
"""

from __future__ import annotations

import importlib
import os

from latentrt.bundle.manifest import Manifest
from latentrt.errors import InputError
from latentrt.runtime.engine import BackendOptions, Engine

BACKENDS: dict[str, str] = {
    "onnxruntime": "latentrt.runtime.backends.onnxruntime.engine",
    "tensorrt": "latentrt.runtime.backends.tensorrt.engine",
    "openvino": "latentrt.runtime.backends.openvino.engine",
}


def load_engines(backend: str, bundle: str | os.PathLike, manifest: Manifest, options: BackendOptions = BackendOptions()) -> dict[str, Engine]:
    """The engines of every component of `manifest`, run by `backend`.

    Raises:
        InputError: an unknown backend name.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[backend]).load_engines(bundle, manifest, options)

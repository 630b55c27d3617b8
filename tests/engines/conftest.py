"""Fixtures for the engine tests: a private copy of the tiny-sd3 bundle, its manifest, the TensorRT-RTX library.

The export itself happens once per session (`tiny_sd3_bundle` in tests/conftest.py); builds write
into copies, never into the shared bundle.
"""

from __future__ import annotations

import shutil

import pytest

from latentrt.bundle.manifest import load_manifest


@pytest.fixture(scope="session")
def engines_bundle(tiny_sd3_bundle, tmp_path_factory):
    """A session-wide copy of the tiny-sd3 bundle, with no engines in it."""
    bundle = tmp_path_factory.mktemp("engines") / "tiny-sd3"
    shutil.copytree(tiny_sd3_bundle, bundle, ignore=shutil.ignore_patterns("engines"))
    return bundle


@pytest.fixture(scope="session")
def manifest(engines_bundle):
    return load_manifest(engines_bundle)


@pytest.fixture
def bundle_copy(engines_bundle, tmp_path):
    """A copy of the bundle for one test to modify (about 3.5 MB)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(engines_bundle, bundle, ignore=shutil.ignore_patterns("engines"))
    return bundle


@pytest.fixture(scope="session")
def rtx():
    """TensorRT-RTX, or a skip when its bindings are not installed."""
    pytest.importorskip(
        "tensorrt_rtx_bindings",
        reason="TensorRT-RTX is not installed: pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings",
    )
    from latentrt.engines.library import load_library

    return load_library("tensorrt-rtx")

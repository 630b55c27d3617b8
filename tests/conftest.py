"""Shared fixtures: one tiny-sd3 pipeline directory and one bundle per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    from latentrt.models.presets import save_preset

    return save_preset("tiny-sd3", tmp_path_factory.mktemp("tiny-sd3-source"))


@pytest.fixture(scope="session")
def tiny_sd3_bundle(tiny_sd3_dir, tmp_path_factory):
    from latentrt.export.pipeline import export_pipeline

    bundle = tmp_path_factory.mktemp("bundles") / "tiny-sd3"
    export_pipeline(tiny_sd3_dir, bundle)
    return bundle

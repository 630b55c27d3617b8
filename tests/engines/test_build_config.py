"""BuildConfig: validation, normalization and JSON round trip (pure Python, no TensorRT)."""

from __future__ import annotations

import json

import pytest

from latentrt.engines import BuildConfig, parse_image_size
from latentrt.errors import InputError


def test_defaults():
    config = BuildConfig()
    assert config.target == "auto" and config.compute_capabilities == () and config.opt_level == 3
    assert config.shape_request().guidance == "cfg" and config.weights == "embedded"


def test_round_trips_json():
    config = BuildConfig(
        compute_capabilities=("8.9", "8.6"),
        batch=(1, 1, 2),
        image_size=parse_image_size("512x512:1024x1024:1024x1024"),
        text_length=(0, 256, 256),
        opt_level=0,
        workspace=1 << 32,
        timing_cache="cache.bin",
        components=("transformer",),
        reuse="rebuild",
        weights="stripped",
    )
    assert BuildConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_normalizes_compute_capabilities_and_lists():
    config = BuildConfig(compute_capabilities=("12.0", "8.9", "8.6", "8.9"), batch=[1, 2, 4], components="vae_decoder")  # type: ignore[arg-type]
    assert config.compute_capabilities == ("8.6", "8.9", "12.0")
    assert config.batch == (1, 2, 4) and config.components == ("vae_decoder",)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target": "onnxruntime"}, "unknown target 'onnxruntime'"),
        ({"compute_capabilities": ("sm86",)}, "MAJOR.MINOR"),
        ({"opt_level": 6}, "opt_level must be an integer from 0"),
        ({"workspace": 0}, "workspace must be a positive number of bytes"),
        ({"reuse": "never"}, "reuse must be 'cache' or 'rebuild'"),
        ({"batch": (2, 1, 4)}, "batch 2:1:4 must satisfy"),
        ({"guidance": "sometimes"}, "guidance must be 'cfg' or 'none'"),
        ({"weights": "lora"}, "weights must be one of embedded, refittable, stripped"),
    ],
)
def test_rejects(kwargs, message):
    with pytest.raises(InputError, match=message):
        BuildConfig(**kwargs)

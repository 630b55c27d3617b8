"""The manifest round-trips through JSON, and every kind of broken bundle gets a specific error."""

from __future__ import annotations

import json
import shutil

import pytest

from latentrt.errors import BundleError
from latentrt.bundle.manifest import SCHEMA_VERSION, Manifest, load_manifest


@pytest.fixture
def bundle_copy(tiny_sd3_bundle, tmp_path):
    return shutil.copytree(tiny_sd3_bundle, tmp_path / "bundle")


def test_round_trip(tiny_sd3_bundle):
    manifest = load_manifest(tiny_sd3_bundle)
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest


def test_records_what_a_runtime_needs(tiny_sd3_bundle):
    m = load_manifest(tiny_sd3_bundle)
    assert m.schema_version == SCHEMA_VERSION and m.family == "sd3"
    assert set(m.components) == {"text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder"}
    transformer = m.components["transformer"]
    assert [s.name for s in transformer.inputs] == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]
    assert transformer.input("hidden_states").shape == ("batch", 16, "latent_height", "latent_width")
    assert transformer.outputs[0].shape == ("batch", 16, "latent_height", "latent_width")
    assert m.components["vae_decoder"].outputs[0].shape == ("batch", 3, "height", "width")
    assert transformer.axes["latent_height"].multiple_of == 2 and transformer.opset >= 18
    for comp in m.components.values():
        assert len(comp.validation) == 2 and {v.shapes[comp.inputs[0].name][0] for v in comp.validation} == {1, 2}
        assert all(err <= 1e-4 for v in comp.validation for err in v.rel_l2.values())
    assert (m.latent.channels, m.latent.vae_scale_factor) == (16, 8)
    assert (m.latent.scaling_factor, m.latent.shift_factor) == (1.5305, 0.0609)
    assert m.scheduler["class_name"] == "FlowMatchEulerDiscreteScheduler" and m.scheduler["config"]["shift"] == 3.0
    assert m.tokenizers["tokenizer"].max_length == 77 and m.tokenizers["tokenizer_3"].max_length == 256


def test_missing_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(BundleError, match="has no manifest.json"):
        load_manifest(tmp_path)


def test_corrupt_manifest(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_manifest(bundle_copy)
    (bundle_copy / "manifest.json").write_text(json.dumps({"schema_version": 1, "family": "sd3"}))
    with pytest.raises(BundleError, match="field .scheduler. is missing or malformed"):
        load_manifest(bundle_copy)


def test_newer_schema(bundle_copy):
    raw = json.loads((bundle_copy / "manifest.json").read_text())
    raw["schema_version"] = SCHEMA_VERSION + 1
    (bundle_copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="newer than this latentrt understands.*upgrade latentrt"):
        load_manifest(bundle_copy)


def test_modified_onnx_file(bundle_copy):
    path = bundle_copy / "onnx" / "vae_decoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a byte of a weight: still well-formed ONNX
    path.write_bytes(data)
    with pytest.raises(BundleError, match="'vae_decoder'.*sha256.*re-export"):
        load_manifest(bundle_copy)
    assert load_manifest(bundle_copy, verify=False).family == "sd3"
    path.write_bytes(data[:-10])  # truncated: not even ONNX, refused without hashing too
    with pytest.raises(BundleError, match="'vae_decoder'.*sha256.*re-export"):
        load_manifest(bundle_copy)
    assert load_manifest(bundle_copy, verify=False).family == "sd3"  # without hashing, ONNX Runtime reports it at load


def test_missing_tokenizer(bundle_copy):
    shutil.rmtree(bundle_copy / "tokenizer_2")
    with pytest.raises(BundleError, match="tokenizer 'tokenizer_2'.*missing"):
        load_manifest(bundle_copy)

"""Bad input: a specific error, and nothing written."""

from __future__ import annotations

import dataclasses
import shutil

import onnx
import pytest

from latentrt.calibration.quantize import QuantizeConfig, quantize_bundle
from latentrt.errors import InputError
from latentrt.bundle.manifest import load_manifest, sha256_file

from .conftest import FAST


def _nothing_written(parent):
    assert [p.name for p in parent.iterdir()] in ([], ["prompts.txt"])


def test_already_quantized_bundle(int8_bundle, tmp_path):
    with pytest.raises(InputError, match="already quantized; calibrate the fp32 bundle"):
        quantize_bundle(int8_bundle, tmp_path / "out", QuantizeConfig(**FAST))
    _nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("content", "match"),
    [("\n  \n# only a comment\n", "holds no prompt"), (b"\xff\xfe\x00bad", "cannot read the prompts file"), (None, "cannot read the prompts file")],
)
def test_bad_prompts_file(tiny_sd3_bundle, tmp_path, content, match):
    path = tmp_path / "prompts.txt"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(InputError, match=match):
        quantize_bundle(tiny_sd3_bundle, tmp_path / "out", QuantizeConfig(prompts_file=path, **FAST))
    _nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("percentile", 0.0, r"percentile must be in \(0, 100\]"),
        ("percentile", 100.5, r"percentile must be in \(0, 100\]"),
        ("smoothquant_alpha", -0.1, r"smoothquant_alpha must be in \[0, 1\]"),
        ("smoothquant_alpha", 1.5, r"smoothquant_alpha must be in \[0, 1\]"),
        ("precision", "int4", "precision must be 'int8' or 'fp8'"),
        ("method", "mse", "method must be"),
        ("exclude", ("(",), "not a valid regular expression"),
        ("num_prompts", 0, "num_prompts must be >= 1"),
    ],
)
def test_bad_options(field, value, match):
    with pytest.raises(InputError, match=match):
        QuantizeConfig(**{field: value})


def test_fp8_needs_an_opset_that_can_express_it(tiny_sd3_bundle, tmp_path):
    bundle = tmp_path / "opset17"
    shutil.copytree(tiny_sd3_bundle, bundle)
    path = bundle / "onnx" / "transformer.onnx"
    model = onnx.load(str(path))
    model.opset_import[0].version = 17  # pretend an older export (LayerNormalization exists at 17)
    onnx.save(model, str(path))
    manifest = load_manifest(bundle, verify=False)
    comp = dataclasses.replace(manifest.components["transformer"], sha256=sha256_file(path), opset=17)
    dataclasses.replace(manifest, components={**manifest.components, "transformer": comp}).save(bundle)
    with pytest.raises(InputError, match=r"opset 17: fp8 needs .* re-export with --opset 19"):
        quantize_bundle(bundle, tmp_path / "out", QuantizeConfig(precision="fp8", **FAST))
    assert not (tmp_path / "out").exists()


def test_output_must_be_a_new_directory(tiny_sd3_bundle, tmp_path):
    with pytest.raises(InputError, match="is the input bundle"):
        quantize_bundle(tiny_sd3_bundle, tiny_sd3_bundle, QuantizeConfig(**FAST))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(InputError, match="not empty; pass --overwrite"):
        quantize_bundle(tiny_sd3_bundle, tmp_path / "full", QuantizeConfig(**FAST))
    assert (tmp_path / "full" / "x").read_text() == "keep"

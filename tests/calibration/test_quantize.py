"""`quantize_bundle` end to end on tiny-sd3: accuracy, the new bundle, determinism, the cache."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from latentrt.calibration.cache import read_calibration_cache, scale_hex, write_calibration_cache
from latentrt.calibration.prompts import prompts_sha256
from latentrt.calibration.quality import QualityReport, compare_bundles, psnr
from latentrt.calibration.quantize import QuantizeConfig, quantize_bundle
from latentrt.bundle.manifest import load_manifest, sha256_file
from latentrt.runtime.backends.onnxruntime.engine import OnnxRuntimeEngine

from .conftest import FAST

# Measured on tiny-sd3 (random weights, 2 prompts x 3 steps of calibration, held-out prompts):
# int8 rel. L2 0.9e-3 to 2.1e-3 and fp8 3.0e-3 to 3.6e-3 across the three methods, with and without
# SmoothQuant. The bounds leave ~2.5x headroom for other calibration sets and ONNX Runtime versions,
# and a floor checks that the graph is really quantized.
BOUNDS = {"int8": 5e-3, "fp8": 1e-2}


def _rel_l2(bundle, reference_bundle, feeds) -> float:
    def engine(b):
        comp = load_manifest(b).components["transformer"]
        return OnnxRuntimeEngine(b / comp.file, comp.inputs, comp.outputs)

    ref, quant = engine(reference_bundle), engine(bundle)
    errors = []
    for f in feeds:
        a, b = ref(f)["sample"], quant(f)["sample"]
        errors.append(np.linalg.norm(b - a) / np.linalg.norm(a))
    return float(np.mean(errors))


@pytest.mark.parametrize("which", ["int8_bundle", "fp8_bundle"])
def test_quantized_denoiser_stays_close_to_fp32(which, request, tiny_sd3_bundle, denoiser_feeds):
    bundle = request.getfixturevalue(which)
    precision = which.split("_")[0]
    error = _rel_l2(bundle, tiny_sd3_bundle, denoiser_feeds)
    assert 1e-4 < error < BOUNDS[precision]


def test_manifest_records_the_quantization(int8_bundle, tiny_sd3_bundle):
    manifest = load_manifest(int8_bundle)  # verifies every sha256
    source = load_manifest(tiny_sd3_bundle)
    comp = manifest.components["transformer"]
    assert comp.precision == "int8" and comp.sha256 == sha256_file(int8_bundle / comp.file) and comp.validation == ()
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae_decoder"):
        assert manifest.components[name] == source.components[name]
    record = manifest.extra["quantization"]["transformer"]
    assert record["method"] == "percentile" and record["parameters"]["percentile"] == 99.99
    assert record["parameters"]["smoothquant_alpha"] == 0.8 and record["parameters"]["steps"] == 3
    assert len(record["smoothquant"]["smoothed"]) == 7
    assert record["num_prompts"] == 2
    from latentrt.calibration.prompts import DEFAULT_PROMPTS, load_prompts

    assert record["prompts_sha256"] == prompts_sha256(load_prompts(DEFAULT_PROMPTS)[:2])
    assert record["source_sha256"] == source.components["transformer"].sha256
    assert not (int8_bundle / "engines").exists()


def test_calibration_cache_matches_the_qdq_scales(int8_bundle):
    path = int8_bundle / "onnx" / "transformer.calibration.cache"
    lines = path.read_text().splitlines()
    assert re.fullmatch(r"TRT-\d+-EntropyCalibration2", lines[0])
    assert all(re.fullmatch(r".+: [0-9a-f]{8}", line) for line in lines[1:])
    _, scales = read_calibration_cache(path)
    model = onnx.load(str(int8_bundle / "onnx" / "transformer.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    q_scales = {n.input[0]: float(numpy_helper.to_array(inits[n.input[1]])) for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert set(scales) == set(q_scales) and len(scales) == 13  # one per distinct layer input
    for name, scale in scales.items():
        assert scale == pytest.approx(q_scales[name], rel=1e-6)  # both are amax / 127


def test_cache_format(tmp_path):
    assert scale_hex(1.0) == "3f800000" and scale_hex(0.5) == "3f000000"
    path = write_calibration_cache(tmp_path / "c.cache", {"x": 127.0, "/a/b:0": 12.7}, trt_version=8601)
    assert path.read_text() == "TRT-8601-EntropyCalibration2\nx: 3f800000\n/a/b:0: 3dcccccd\n"
    assert read_calibration_cache(path) == ("TRT-8601-EntropyCalibration2", {"x": 1.0, "/a/b:0": pytest.approx(0.1)})


def test_same_seed_same_scales_and_exclusions(tiny_sd3_bundle, int8_bundle, tmp_path, caplog):
    config = QuantizeConfig(precision="int8", **FAST)
    quantize_bundle(tiny_sd3_bundle, tmp_path / "again", config)
    assert sha256_file(tmp_path / "again/onnx/transformer.onnx") == sha256_file(int8_bundle / "onnx/transformer.onnx")
    assert (tmp_path / "again/onnx/transformer.calibration.cache").read_text() == (int8_bundle / "onnx/transformer.calibration.cache").read_text()

    other = QuantizeConfig(precision="int8", seed=1, exclude=(r"transformer_blocks\.1/ff/", "no_such_layer"), **FAST)
    with caplog.at_level(logging.WARNING, logger="latentrt.calibration"):
        manifest = quantize_bundle(tiny_sd3_bundle, tmp_path / "seed1", other)
    assert any("no_such_layer" in r.getMessage() and "matches no" in r.getMessage() for r in caplog.records)
    record = manifest.extra["quantization"]["transformer"]
    assert record["excluded_layers"]["/model/transformer_blocks.1/ff/net.2/MatMul"] == "--exclude 'transformer_blocks\\\\.1/ff/'"
    assert record["quantized_nodes"] == 11
    _, a = read_calibration_cache(int8_bundle / "onnx/transformer.calibration.cache")
    _, b = read_calibration_cache(tmp_path / "seed1/onnx/transformer.calibration.cache")
    assert any(a[k] != b[k] for k in a if k in b)  # other latents, other ranges


def test_config_round_trips_through_json():
    config = QuantizeConfig(precision="fp8", method="entropy", smoothquant_alpha=None, exclude=("a", "b"), steps=4)
    assert QuantizeConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_quality_report_on_held_out_prompts(tiny_sd3_bundle, int8_bundle):
    report = compare_bundles(tiny_sd3_bundle, int8_bundle, ["a blue circle on the right"], steps=2, seed=5)
    assert len(report.psnr_db) == 1 and report.seeds == (5,)
    assert 30.0 < report.mean_psnr_db <= 100.0  # measured ~60 dB on tiny-sd3
    assert QualityReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    image = np.full((4, 4, 3), 0.5)
    assert psnr(image, image) == 100.0 and psnr(image, image + 0.1) == pytest.approx(20.0)


def test_onnx_runtime_runs_every_quantized_matmul_in_int8(int8_bundle, tmp_path):
    """Each Q/DQ MatMul reaches ONNX Runtime's CPU provider as MatMulIntegerToFloat. Q, K and V share
    one input: exported as one MatMul they get one Q/DQ pair (ONNX Runtime leaves a DQ -> MatMul whose
    quantized input has several readers in float, with the weights dequantized on every call)."""
    import collections

    import onnx
    import onnxruntime as ort

    path = int8_bundle / "onnx" / "transformer.onnx"
    source = onnx.load(str(path))
    producers = {o: n.op_type for n in source.graph.node for o in n.output}
    quantized = sum(
        1 for n in source.graph.node if n.op_type == "MatMul" and all(producers.get(i) == "DequantizeLinear" for i in n.input)
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert quantized > 0 and ops["MatMulIntegerToFloat"] == quantized

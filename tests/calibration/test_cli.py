"""`latentrt calibrate`: a thin layer over quantize_bundle."""

from __future__ import annotations

from latentrt.cli.main import main
from latentrt.bundle.manifest import load_manifest


def test_calibrate_command_writes_a_quantized_bundle(tiny_sd3_bundle, tmp_path, capsys):
    out = tmp_path / "q"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    code = main(["calibrate", str(tiny_sd3_bundle), "-o", str(out), "--precision", "int8", "--prompts", str(prompts),
                 "--steps", "2", "--method", "minmax", "--no-smoothquant"])
    assert code == 0
    record = load_manifest(out).extra["quantization"]["transformer"]
    assert record["method"] == "minmax" and record["smoothquant"] is None and record["num_prompts"] == 2
    assert (out / "onnx/transformer.calibration.cache").read_text().startswith("TRT-")
    assert "wrote" in capsys.readouterr().out


def test_calibrate_bad_option_is_one_line(tiny_sd3_bundle, tmp_path, capsys):
    code = main(["calibrate", str(tiny_sd3_bundle), "-o", str(tmp_path / "q"), "--precision", "int8", "--percentile", "0"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: percentile must be in (0, 100]") and "\n" not in err
    assert not (tmp_path / "q").exists()

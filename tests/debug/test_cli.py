"""`latentrt debug`: the report on stdout, the JSON and the PNG; user errors in one line."""

from __future__ import annotations

import json

from latentrt.cli.main import main


def test_debug_command_writes_json_and_plot(t5_overflow, tmp_path, capsys):
    fp32, naive, _, node = t5_overflow
    out_json, out_png = tmp_path / "report.json", tmp_path / "plot.png"
    code = main(["debug", str(naive), "--component", "text_encoder_3", "--reference", str(fp32), "--steps", "2",
                 "--json", str(out_json), "--plot", str(out_png), "--top", "3"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"first NaN/Inf:        {node}" in out and "latentrt export SOURCE -o BUNDLE --precision fp16" in out
    report = json.loads(out_json.read_text())
    assert report["component"] == "text_encoder_3" and report["first_nonfinite"] == node
    assert node in report["suggestion"]["keep_fp32"]
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_fp32_bundle_without_reference_is_a_one_line_error(tiny_sd3_bundle, capsys):
    assert main(["debug", str(tiny_sd3_bundle), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is fp32" in err and "--reference" in err


def test_unknown_component_names_the_choices(tiny_sd3_bundle, capsys):
    assert main(["debug", str(tiny_sd3_bundle), "--component", "unet", "--reference", str(tiny_sd3_bundle)]) == 2
    assert "has no component 'unet'" in capsys.readouterr().err

"""The CLI is a thin layer: help, version, exit codes, one-line errors."""

from __future__ import annotations

import re

import pytest

from latentrt import __version__
from latentrt.cli.main import main


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("export", "generate", "inspect"):
        assert name in out
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_export_inspect_generate(tiny_sd3_dir, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    assert main(["export", str(tiny_sd3_dir), "-o", str(bundle), "--max-sequence-length", "64"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "family:    sd3" in out and "transformer" in out and "latent_height" in out and "T5 length 64" in out
    image = tmp_path / "out.png"
    assert main(["generate", str(bundle), "-p", "a red cat", "-o", str(image), "--steps", "2", "--height", "64", "--width", "96"]) == 0
    out = capsys.readouterr().out
    assert "denoising (2 steps)" in out and "VAE decode" in out and f"wrote {image}" in out
    from PIL import Image

    assert Image.open(image).size == (96, 64)


@pytest.mark.parametrize(
    "args,message",
    [
        (["export", "no-such-thing", "-o", "{tmp}/b"], "neither a built-in preset"),
        (["inspect", "{tmp}/missing"], "does not exist"),
        (["generate", "{tmp}/missing", "-p", "x", "-o", "{tmp}/x.png"], "does not exist"),
        (["export", "tiny-sd3", "-o", "{tmp}/b", "--opset", "13"], "opset 13 is too old"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_generate_rejects_bad_size_and_steps(tiny_sd3_bundle, tmp_path, capsys):
    assert main(["generate", str(tiny_sd3_bundle), "-p", "x", "-o", str(tmp_path / "x.png"), "--height", "100"]) == 2
    assert "nearest valid height is 96" in capsys.readouterr().err
    assert main(["generate", str(tiny_sd3_bundle), "-p", "x", "-o", str(tmp_path / "x.png"), "--steps", "0"]) == 2
    assert "--steps': 0 is not in the range x>=1" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_build_then_cached_then_inspect(tiny_sd3_bundle, tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX wheels (tensorrt-rtx-cu13-*) are not installed")
    import shutil

    bundle = shutil.copytree(tiny_sd3_bundle, tmp_path / "bundle")
    args = ["build", str(bundle), "--components", "text_encoder", "--compute-capability", "8.9", "--batch", "1:1:2"]
    assert main(args) == 0
    assert re.search(r"^text_encoder +built ", capsys.readouterr().out, re.M)
    assert main(args) == 0
    assert re.search(r"^text_encoder +cached ", capsys.readouterr().out, re.M)
    assert main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^text_encoder\.\w+\.engine +current +tensorrt-rtx [\d.]+ +8\.9 ", out, re.M)
    assert "GPU memory at the profiles' max" in out
    assert main(["build", str(bundle), "--static", "100x100"]) == 2
    assert "nearest valid: 96 or 112" in capsys.readouterr().err

"""Tracebacks instead of errors: every bad argument of the Python API and the CLI is one clear error
naming the argument, what was wrong and what is valid (CLI: one line, exit 2), raised before any
large allocation or any file is created."""

from __future__ import annotations

import math
import shutil
import tracemalloc

import numpy as np
import pytest

from latentrt.cli.main import main
from latentrt.errors import InputError
from latentrt.runtime.pipeline import Pipeline

LATENT = (1, 16, 8, 8)  # tiny-sd3 at 64x64


@pytest.fixture(scope="module")
def pipe(tiny_sd3_bundle):
    return Pipeline.load(tiny_sd3_bundle)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(prompt=None), "prompt must be a str or a list of str, got NoneType"),
        (dict(prompt=123), "prompt must be a str or a list of str, got int"),
        (dict(prompt=b"a cat"), r"prompt must be a str or a list of str, got bytes \(decode bytes first"),
        (dict(prompt=["a cat", 1]), r"prompt\[1\] must be a str, got int 1"),
        (dict(prompt=[]), "prompt is an empty list"),
        (dict(prompt="a \ud800 cat"), r"prompt is not valid text: it holds a lone surrogate '\\ud800' at index 2"),
        (dict(prompt=["ok", "\udcff"]), r"prompt\[1\] is not valid text"),
        (dict(negative_prompt=5), "negative_prompt must be a str or a list of str, got int"),
        (dict(negative_prompt=["a", "b"]), "2 negative prompts for 1 prompts"),
        (dict(latents=np.zeros(LATENT, np.float32).tolist()), "latents must be a numpy array of shape .*got list"),
        (dict(latents=np.full(LATENT, np.nan, np.float32)), "latents hold 1024 NaN or infinite values"),
        (dict(latents=np.where(np.eye(8, dtype=bool), np.inf, 0).astype(np.float32)[None, None].repeat(16, 1)), "latents hold 128 NaN or infinite"),
        (dict(latents=np.zeros(LATENT, np.int64)), "latents must be floating point"),
        (dict(seed=1.5), "seed must be an integer, got float 1.5"),
        (dict(seed=-1), "seed must be >= 0, got -1"),
        (dict(seed="0"), "seed must be an integer, got str"),
        (dict(num_inference_steps=1.5), "num_inference_steps must be an integer, got float 1.5"),
        (dict(num_inference_steps=0), "num_inference_steps must be >= 1 and <= 10000, got 0"),
        (dict(num_inference_steps=10**12), "num_inference_steps must be >= 1 and <= 10000, got 1000000000000"),
        (dict(num_inference_steps=True), "num_inference_steps must be an integer, got bool"),
        (dict(guidance_scale="7"), "guidance_scale must be a number, got str '7'"),
        (dict(guidance_scale=math.nan), "guidance_scale must be a finite number, got nan"),
        (dict(guidance_scale=-math.inf), "guidance_scale must be a finite number, got -inf"),
        (dict(height="32"), "height must be an integer, got str '32'"),
        (dict(width=64.0), "width must be an integer, got float"),
        (dict(height=-64), "height must be >= 1"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt must be >= 1"),
        (dict(num_images_per_prompt=10**9), r"1000000000 images of 64x64 need at least .* GiB .* ask for fewer images"),
        (dict(max_sequence_length=10**6), r"max_sequence_length 1000000 is outside this bundle's range 0..512"),
        (dict(max_sequence_length=-1), "max_sequence_length must be >= 0"),
        (dict(max_sequence_length=2.0), "max_sequence_length must be an integer"),
        (dict(callback=5), "callback must be callable"),
    ],
)
def test_python_api_bad_arguments(pipe, kwargs, message):
    call = dict(prompt="a red cat", num_inference_steps=1, height=64, width=64, seed=0) | kwargs
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=message):
            pipe(**call)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB allocated before the argument was refused"


def test_python_api_accepts_what_is_valid(pipe):
    """numpy scalars, tuples of prompts, float64 latents, T5 lengths inside the range."""
    latents = np.random.default_rng(0).standard_normal(LATENT)
    out = pipe(("a red cat",), num_inference_steps=np.int64(1), guidance_scale=np.float32(3), height=64, width=64,
               seed=np.uint32(1), latents=latents, max_sequence_length=16)
    ref = pipe("a red cat", num_inference_steps=1, guidance_scale=3.0, height=64, width=64, latents=latents.astype(np.float32),
               max_sequence_length=16)
    np.testing.assert_array_equal(out.pixels, ref.pixels)


def test_load_bad_arguments(tiny_sd3_bundle):
    with pytest.raises(InputError, match="threads must be an integer >= 0"):
        Pipeline.load(tiny_sd3_bundle, threads=-1)
    with pytest.raises(InputError, match="unknown backend 'cuda'"):
        Pipeline.load(tiny_sd3_bundle, backend="cuda")
    with pytest.raises(InputError, match="bundle must be a path"):
        Pipeline.load(None)
    with pytest.raises(InputError, match="providers must be a list"):
        Pipeline.load(tiny_sd3_bundle, providers="CPUExecutionProvider")


GEN = ["generate", "{bundle}", "-p", "a cat", "--steps", "1", "--height", "64", "--width", "64"]


@pytest.mark.parametrize(
    "args,message",
    [
        (GEN + ["--seed", "-1", "-o", "{tmp}/x.png"], "Invalid value for '--seed': -1 is not in the range x>=0"),
        (GEN + ["--guidance", "nan", "-o", "{tmp}/x.png"], "Invalid value for '--guidance': 'nan' is not a finite number"),
        (GEN + ["--guidance", "inf", "-o", "{tmp}/x.png"], "Invalid value for '--guidance': 'inf' is not a finite number"),
        (GEN + ["--num-images", "0", "-o", "{tmp}/x.png"], "Invalid value for '--num-images': 0 is not in the range x>=1"),
        (GEN + ["--num-images", "1000000000", "-o", "{tmp}/x.png"], "1000000000 images of 64x64 need at least"),
        (GEN + ["-o", "{tmp}/missing/x.png"], "the folder {tmp}/missing does not exist"),
        (GEN + ["-o", "{tmp}"], "output {tmp} is a directory"),
        (GEN + ["-o", "{tmp}/x"], "output {tmp}/x has no extension; name the image file with a format's extension (.png"),
        (GEN + ["-o", "{tmp}/x.xyz"], "has the extension '.xyz'"),
        (["eval", "{bundle}", "--steps", "0"], "Invalid value for '--steps': 0 is not in the range x>=1"),
        (["eval", "{bundle}", "--steps", "1", "--json", "{tmp}"], "output {tmp} is a directory"),
        (["eval", "{bundle}", "--steps", "1", "--json", "{tmp}/no/x.json"], "the folder {tmp}/no does not exist"),
        (["build", "{bundle}", "--workspace-mb", "0"], "Invalid value for '--workspace-mb': 0 is not in the range x>=1"),
        (["calibrate", "{bundle}", "-o", "{tmp}/q", "--precision", "int8", "--guidance", "nan"], "'nan' is not a finite number"),
        (["calibrate", "{bundle}", "-o", "{tmp}/q", "--precision", "int8", "--percentile", "0"], "percentile must be in (0, 100]"),
        (["calibrate", "{bundle}", "-o", "{tmp}/q", "--precision", "int8", "--smoothquant-alpha", "nan"], "smoothquant_alpha must be in [0, 1]"),
        (["export", "tiny-sd3", "-o", "{tmp}/b", "--max-batch", "0"], "Invalid value for '--max-batch'"),
        (["generate", "{bundle}", "-o", "{tmp}/x.png"], "Missing option '-p' / '--prompt'"),
        (["inspect"], "Missing argument 'BUNDLE'"),
        (["generate", "{bundle}", "-p", "x", "-o", "{tmp}/x.png", "--no-such-flag"], "--no-such-flag"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(tiny_sd3_bundle, tmp_path, capsys, args, message):
    fill = {"bundle": str(tiny_sd3_bundle), "tmp": str(tmp_path)}
    assert main([a.format(**fill) for a in args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in captured.err
    assert message.format(**fill) in err
    assert list(tmp_path.iterdir()) == []


def test_cli_max_sequence_length_beyond_the_bundle(tiny_sd3_dir, tmp_path, capsys):
    """A bundle exported with T5 length 64 still takes its own range; beyond it, one line."""
    from latentrt.export.pipeline import ExportConfig, export_pipeline

    bundle = tmp_path / "b64"
    export_pipeline(tiny_sd3_dir, bundle, ExportConfig(max_sequence_length=64))
    pipe = Pipeline.load(bundle)
    with pytest.raises(InputError, match=r"max_sequence_length 600 is outside this bundle's range 0..512"):
        pipe("a cat", num_inference_steps=1, height=64, width=64, max_sequence_length=600)
    assert pipe("a cat", num_inference_steps=1, height=64, width=64, max_sequence_length=0).pixels.shape == (1, 64, 64, 3)


def test_cli_errors_from_the_library_are_one_line(tiny_sd3_bundle, tmp_path, capsys):
    bundle = shutil.copytree(tiny_sd3_bundle, tmp_path / "bundle")
    (bundle / "tokenizer" / "tokenizer.json").write_text("garbage\n{\n")
    assert main(["generate", str(bundle), "-p", "x", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a valid tokenizer.json" in err
    assert not (tmp_path / "x.png").exists()

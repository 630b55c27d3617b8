"""The OpenVINO backend: same images as ONNX Runtime, int8 graphs exact on CPUs whose int8 kernels
saturate, compiled models cached in the bundle, concurrent calls."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install -e '.[openvino]')")

from latentrt.bundle.manifest import load_manifest  # noqa: E402
from latentrt.errors import InputError, LatentRTError  # noqa: E402
from latentrt.runtime.backends import cpu  # noqa: E402
from latentrt.runtime.backends.openvino import engine as ov_engine  # noqa: E402
from latentrt.runtime.backends.openvino.cache import CACHE_DIR, CompiledModelSpec, cache_folder  # noqa: E402
from latentrt.runtime.backends.openvino.engine import OpenVinoEngine, resolve_int8, resolve_precision  # noqa: E402
from latentrt.runtime.pipeline import Pipeline  # noqa: E402


@pytest.fixture
def bundle(tiny_sd3_bundle, tmp_path):
    """A private copy: the backend writes its compiled-model cache into the bundle."""
    return shutil.copytree(tiny_sd3_bundle, tmp_path / "bundle")


def _feeds(comp, batch=2, size=16, seed=0):
    rng = np.random.default_rng(seed)
    sizes = {"batch": batch, "latent_height": size, "latent_width": size, "context_length": 77 + 8}
    return {s.name: rng.standard_normal([sizes.get(d, d) for d in s.shape]).astype(np.float32) for s in comp.inputs}


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _with_cpu(monkeypatch, flags):
    real = cpu.cpu_info()
    monkeypatch.setattr(ov_engine, "cpu_info", lambda: cpu.CpuInfo(real.name, "x86_64", frozenset(flags)))


def test_images_match_onnx_runtime(bundle):
    """fp32 on this CPU (bf16 only where the CPU has it): the same images as ONNX Runtime from the same latents."""
    kwargs = dict(num_inference_steps=3, guidance_scale=4.0, seed=3, height=64, width=96)
    with Pipeline.load(bundle) as reference, Pipeline.load(bundle, backend="openvino") as pipe:
        expected = reference(["a red circle", "a blue square"], **kwargs)
        actual = pipe(["a red circle", "a blue square"], **kwargs)
        precisions = {e.precision for e in pipe.engines.values()}
    assert actual.pixels.shape == expected.pixels.shape == (2, 64, 96, 3)
    assert set(actual.timings) == set(expected.timings) and len(actual.timings["denoising_steps"]) == 3
    if precisions == {"f32"}:
        assert np.abs(actual.pixels - expected.pixels).max() < 1e-4
    else:  # bf16 matrix units: an 8-bit mantissa
        assert precisions == {"bf16"} and cpu.cpu_info().bf16
        assert np.abs(actual.pixels - expected.pixels).mean() < 2e-2


def test_int8_graph_is_exact_where_int8_kernels_saturate(int8_bundle):
    """Without VNNI the x86 u8 x s8 dot product saturates; "auto" then compiles the Q/DQ pairs in float
    (the Q/DQ graph's values); with VNNI/AMX it uses OpenVINO's int8 kernels, integer-exact too."""
    comp = load_manifest(int8_bundle).components["transformer"]
    path = int8_bundle / comp.file
    feeds = _feeds(comp)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    expected = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(["sample"], feeds)[0]
    actual = OpenVinoEngine(path, comp.inputs, comp.outputs)(feeds)["sample"]
    assert _rel(actual, expected) < 1e-3
    if not cpu.cpu_info().int8_dot:
        saturated = OpenVinoEngine(path, comp.inputs, comp.outputs, int8="kernels")(feeds)["sample"]
        assert _rel(saturated, expected) > 3 * _rel(actual, expected)


@pytest.mark.parametrize(
    "flags,precision,int8",
    [
        ({"avx2", "fma"}, "f32", "exact"),  # AMD EPYC Milan
        ({"avx2", "avx512f", "avx512_vnni"}, "f32", "kernels"),  # AVX-512 with VNNI, no bf16 (Xeon Cascade/Ice Lake)
        ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}, "bf16", "kernels"),  # AMD EPYC Genoa (Zen 4: AVX-512 bf16, no AMX)
        ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}, "bf16", "kernels"),  # Xeon with AMX
    ],
)
def test_path_chosen_per_cpu(monkeypatch, flags, precision, int8):
    _with_cpu(monkeypatch, flags)
    assert (resolve_precision("auto"), resolve_int8("auto")) == (precision, int8)
    assert (resolve_precision("f32"), resolve_int8("exact")) == ("f32", "exact")  # an explicit choice is kept
    with pytest.raises(InputError, match="precision must be"):
        resolve_precision("fp16")
    with pytest.raises(InputError, match="int8 must be"):
        resolve_int8("fast")


def test_precision_reported_is_the_compiled_one(bundle):
    """bf16 asked for on a CPU without bf16 units: OpenVINO compiles float32 and the engine says so."""
    comp = load_manifest(bundle).components["vae_decoder"]
    engine = OpenVinoEngine(bundle / comp.file, comp.inputs, comp.outputs, precision="bf16")
    assert engine.precision == ("bf16" if cpu.cpu_info().bf16 else "f32")


def test_second_load_comes_from_the_cache(bundle):
    manifest = load_manifest(bundle)
    first = ov_engine.load_engines(bundle, manifest)
    folders = sorted((bundle / CACHE_DIR).iterdir())
    assert [f.name.split(".")[0] for f in folders] == sorted(manifest.components)
    for folder in folders:
        assert (folder / "spec.json").is_file() and list(folder.glob("*.blob"))
    second = ov_engine.load_engines(bundle, manifest)
    assert sorted((bundle / CACHE_DIR).iterdir()) == folders  # same keys, no new folder
    comp = manifest.components["transformer"]
    feeds = _feeds(comp)
    np.testing.assert_array_equal(first["transformer"](feeds)["sample"], second["transformer"](feeds)["sample"])
    assert second["transformer"].compile_s < first["transformer"].compile_s
    shutil.rmtree(bundle / CACHE_DIR)
    ov_engine.load_engines(bundle, manifest, cache=False)
    assert not (bundle / CACHE_DIR).exists()


def test_cache_key_covers_what_changes_the_compiled_model(tmp_path):
    spec = CompiledModelSpec("transformer", "a" * 64, "2026.4.1", "f32", "AMD EPYC", ("avx2", "fma"), "exact")
    others = [
        CompiledModelSpec("transformer", "b" * 64, "2026.4.1", "f32", "AMD EPYC", ("avx2", "fma"), "exact"),
        CompiledModelSpec("transformer", "a" * 64, "2026.5.0", "f32", "AMD EPYC", ("avx2", "fma"), "exact"),
        CompiledModelSpec("transformer", "a" * 64, "2026.4.1", "bf16", "AMD EPYC", ("avx2", "fma"), "exact"),
        CompiledModelSpec("transformer", "a" * 64, "2026.4.1", "f32", "AMD EPYC", ("avx2", "avx512f", "fma"), "exact"),
        CompiledModelSpec("transformer", "a" * 64, "2026.4.1", "f32", "AMD EPYC", ("avx2", "fma"), "kernels"),
        CompiledModelSpec("vae_decoder", "a" * 64, "2026.4.1", "f32", "AMD EPYC", ("avx2", "fma"), "exact"),
    ]
    assert len({spec.folder(tmp_path), *(o.folder(tmp_path) for o in others)}) == 7
    assert spec.folder(tmp_path) == tmp_path / "engines" / "openvino" / f"transformer.{spec.key[:16]}"
    assert spec.key == CompiledModelSpec(**{k: v for k, v in vars(spec).items()}).key


def test_unwritable_bundle_compiles_without_cache(bundle):
    """A bundle where the cache cannot be made (here `engines` is a file) still loads; nothing is cached."""
    (bundle / "engines").write_text("not a folder")
    spec = CompiledModelSpec("vae_decoder", "a" * 64, "1", "f32", "cpu", ())
    assert cache_folder(bundle, spec) is None
    manifest = load_manifest(bundle)
    engines = ov_engine.load_engines(bundle, manifest)
    comp = manifest.components["vae_decoder"]
    assert engines["vae_decoder"](_feeds(comp, batch=1, size=8))["sample"].shape == (1, 3, 64, 64)
    assert (bundle / "engines").read_text() == "not a folder"


def test_concurrent_calls_match_serial_ones(bundle):
    comp = load_manifest(bundle).components["transformer"]
    engine = OpenVinoEngine(bundle / comp.file, comp.inputs, comp.outputs)
    feeds = [_feeds(comp, batch=1 + i % 2, size=8 + 4 * (i % 3), seed=i) for i in range(6)]
    serial = [engine(f)["sample"] for f in feeds]
    results: dict[int, np.ndarray] = {}

    def work(offset):
        for _ in range(3):
            for i in range(offset, len(feeds), 3):
                results[i] = engine(feeds[i])["sample"]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, expected in enumerate(serial):
        np.testing.assert_array_equal(results[i], expected)


def test_feed_errors_and_close(bundle):
    comp = load_manifest(bundle).components["vae_decoder"]
    engine = OpenVinoEngine(bundle / comp.file, comp.inputs, comp.outputs)
    feeds = _feeds(comp, batch=1, size=8)
    with pytest.raises(InputError, match="missing input 'latent_sample'"):
        engine({})
    with pytest.raises(InputError, match="dtype float64, expected float32"):
        engine({"latent_sample": feeds["latent_sample"].astype(np.float64)})
    with pytest.raises(InputError, match="expected rank 4"):
        engine({"latent_sample": feeds["latent_sample"][0]})
    engine.close()
    with pytest.raises(InputError, match="closed"):
        engine(feeds)


def test_missing_openvino_says_how_to_install(monkeypatch, bundle):
    import builtins

    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(LatentRTError, match=r"pip install -e \"\.\[openvino\]\""):
        Pipeline.load(bundle, backend="openvino")


def test_cli_generate_and_eval_on_openvino(bundle, tmp_path, capsys, monkeypatch):
    """`--backend openvino` for generate and eval; eval --compare measures OpenVINO against ONNX Runtime's
    float32 (on 4 of the demo's 64 eval prompts, 2 held-out and 2 seen, to keep the test short)."""
    import json

    from latentrt.cli.main import main
    from latentrt.models.demo import evaluate

    prompts = evaluate.eval_prompts
    monkeypatch.setattr(evaluate, "eval_prompts", lambda seed: [p for p in prompts(seed) if p[2]][:2] + [p for p in prompts(seed) if not p[2]][:2])
    image = tmp_path / "x.png"
    assert main(["generate", str(bundle), "-p", "a red circle", "-o", str(image), "--steps", "2", "--backend", "openvino"]) == 0
    assert image.is_file() and "total" in capsys.readouterr().out
    report = tmp_path / "eval.json"
    code = main(["eval", str(bundle), "--backend", "openvino", "--compare", str(bundle), "--steps", "1", "--json", str(report)])
    assert code == 0
    result = json.loads(report.read_text())
    assert result["settings"]["backend"] == "openvino" and result["settings"]["reference_backend"] == "onnxruntime"
    assert len(result["psnr_db"]) == result["settings"]["prompts"] == 4
    assert min(result["psnr_db"]) > (60 if not cpu.cpu_info().bf16 else 30)  # float32 here: the same images
    assert "PSNR against the reference" in capsys.readouterr().out

"""Swapping adapters on tiny-sd3: no file read, only touched components rebuilt, exact restore;
quantized bundles; merged bundles; every bad input refused with the pipeline left as it was."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from latentrt.bundle.manifest import load_manifest
from latentrt.errors import BundleError, InputError
from latentrt.runtime.lora.weights import ComponentWeights
from latentrt.runtime.pipeline import Pipeline

CALL = dict(prompt=["a red cat on the left"], num_inference_steps=2, height=64, width=64, guidance_scale=4.0)
LATENTS = np.random.default_rng(0).standard_normal((1, 16, 8, 8), dtype=np.float32)
DENOISER = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.norm1.linear",
            "transformer_blocks.1.ff.net.0.proj"]
TEXT = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.self_attn.out_proj"]


def make_lora(bundle, kit, name, *, seed=0, scale=0.3, denoiser=DENOISER, text=(), rank=4, alpha=None):
    """A PEFT LoRA shaped from the bundle's own weight map (no torch model needed)."""
    manifest = load_manifest(bundle)
    tensors = {}
    for k, (component, modules) in enumerate((("transformer", denoiser), ("text_encoder", text))):
        rng = np.random.default_rng([seed, k])
        weights = ComponentWeights(component, manifest.components[component].weights)
        for module in modules:
            out_dim, in_dim = weights.param_shape(f"{module}.weight")
            tensors[f"{component}.{module}.lora_A.weight"] = rng.standard_normal((rank, in_dim), dtype=np.float32) * scale
            tensors[f"{component}.{module}.lora_B.weight"] = rng.standard_normal((out_dim, rank), dtype=np.float32) * scale
            if alpha is not None:
                tensors[f"{component}.{module}.alpha"] = np.array(alpha, np.float32)
    return kit.write(name, tensors)


@pytest.fixture
def pipe(tiny_sd3_bundle):
    with Pipeline.load(tiny_sd3_bundle) as p:
        yield p


def image(p):
    return p(**CALL, latents=LATENTS).pixels


def test_swaps_read_no_file_and_restore_exactly(tiny_sd3_bundle, tmp_path, kit):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sd3_bundle, bundle)
    a = make_lora(bundle, kit, "a", seed=1, text=TEXT)
    b = make_lora(bundle, kit, "b", seed=2, alpha=2.0)
    with Pipeline.load(bundle) as p:
        base = image(p)
        p.load_lora_weights(a, adapter_name="a")
        p.load_lora_weights(b, adapter_name="b")
        expected = {}
        for names, weights in ((["a"], [1.0]), (["b"], [1.0]), (["a", "b"], [0.7, -0.4])):
            p.set_adapters(names, adapter_weights=weights)
            expected[tuple(names)] = image(p)
        os.rename(bundle / "onnx", tmp_path / "moved")  # from here on, no ONNX file can be read
        try:
            for _ in range(2):
                for names, weights in ((["a", "b"], [0.7, -0.4]), (["a"], [1.0]), (["b"], [1.0])):
                    p.set_adapters(names, adapter_weights=weights)
                    np.testing.assert_array_equal(image(p), expected[tuple(names)])
            p.set_adapters([])
            np.testing.assert_array_equal(image(p), base)  # the bundle's weights, bit for bit
            assert p.get_active_adapters() == []
        finally:
            os.rename(tmp_path / "moved", bundle / "onnx")


def test_only_touched_components_are_rebuilt(pipe, tiny_sd3_bundle, kit):
    sessions = {name: engine._session for name, engine in pipe.engines.items()}
    pipe.load_lora_weights(make_lora(tiny_sd3_bundle, kit, "denoiser-only"), adapter_name="d")
    same = [name for name, engine in pipe.engines.items() if engine._session is sessions[name]]
    assert sorted(same) == ["text_encoder", "text_encoder_2", "text_encoder_3", "vae_decoder"]
    assert pipe.get_list_adapters() == {"transformer": ["d"]}
    before = pipe.engines["transformer"]._session
    pipe.set_adapters(["d"], adapter_weights=[1.0])  # the same mix again: nothing is rebuilt
    assert pipe.engines["transformer"]._session is before


def test_text_encoder_lora_refreshes_kept_negative_encodings(pipe, tiny_sd3_bundle, kit):
    """The pipeline keeps the negative prompt's encodings; a text-encoder LoRA must not see stale ones."""
    image(pipe)  # fills the cache with the bundle's encodings
    pipe.load_lora_weights(make_lora(tiny_sd3_bundle, kit, "te", denoiser=(), text=TEXT), adapter_name="te")
    cached = image(pipe)
    with Pipeline.load(tiny_sd3_bundle) as fresh:
        fresh.load_lora_weights(make_lora(tiny_sd3_bundle, kit, "te", denoiser=(), text=TEXT), adapter_name="te")
        np.testing.assert_array_equal(cached, image(fresh))


def test_diffusers_default_names_and_weight_per_component(pipe, tiny_sd3_bundle, kit):
    path = make_lora(tiny_sd3_bundle, kit, "mixed", text=TEXT)
    pipe.load_lora_weights(path)
    assert pipe.get_active_adapters() == ["default_0"]
    pipe.set_adapters("default_0", adapter_weights={"transformer": 0.0, "text_encoder": 1.0})
    text_only = image(pipe)
    with Pipeline.load(tiny_sd3_bundle) as other:
        other.load_lora_weights(make_lora(tiny_sd3_bundle, kit, "te-only", denoiser=(), text=TEXT))
        np.testing.assert_array_equal(text_only, image(other))


# -- bad inputs ------------------------------------------------------------------------------------


def _write_raw(kit, name, tensors):
    return kit.write(name, {k: np.asarray(v, np.float32) for k, v in tensors.items()})


def test_bad_inputs_are_refused_and_the_pipeline_keeps_its_adapters(pipe, tiny_sd3_bundle, kit, tmp_path):
    good = make_lora(tiny_sd3_bundle, kit, "good", seed=3)
    pipe.load_lora_weights(good, adapter_name="good")
    with_good = image(pipe)
    weights = ComponentWeights("transformer", load_manifest(tiny_sd3_bundle).components["transformer"].weights)
    out_dim, in_dim = weights.param_shape("transformer_blocks.0.attn.to_q.weight")
    q = "transformer.transformer_blocks.0.attn.to_q"
    pickled = tmp_path / "lora.bin"
    import pickle

    pickled.write_bytes(pickle.dumps({"x": 1}))
    cases = [
        (make_lora(tiny_sd3_bundle, kit, "again", seed=4), "good", "already loaded"),
        (_write_raw(kit, "sdxl", {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": np.ones((4, 640)),
                                  "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": np.ones((640, 4))}),
         "sdxl", "match no weight of this sd3 bundle"),
        (_write_raw(kit, "size", {f"{q}.lora_A.weight": np.ones((4, in_dim * 2)), f"{q}.lora_B.weight": np.ones((out_dim, 4))}),
         "size", "trained for another model"),
        (_write_raw(kit, "rank", {f"{q}.lora_A.weight": np.ones((4, in_dim)), f"{q}.lora_B.weight": np.ones((out_dim, 8))}),
         "rank", "rank mismatch"),
        (_write_raw(kit, "nan", {f"{q}.lora_A.weight": np.full((4, in_dim), np.nan), f"{q}.lora_B.weight": np.ones((out_dim, 4))}),
         "nan", "NaN or infinite"),
        (_write_raw(kit, "half", {f"{q}.lora_A.weight": np.ones((4, in_dim))}), "half", r"but no B \(up\) matrix"),
        (_write_raw(kit, "partial", {f"{q}.lora_A.weight": np.ones((4, in_dim)), f"{q}.lora_B.weight": np.ones((out_dim, 4)),
                                     "transformer.not_a_module.lora_A.weight": np.ones((4, 4)),
                                     "transformer.not_a_module.lora_B.weight": np.ones((4, 4))}),
         "partial", "transformer.not_a_module.lora_A.weight"),
        (_write_raw(kit, "dora", {f"{q}.lora_A.weight": np.ones((4, in_dim)), f"{q}.lora_B.weight": np.ones((out_dim, 4)),
                                  f"{q}.lora_magnitude_vector": np.ones(out_dim)}), "dora", "DoRA"),
        (pickled, "pickle", "pickled PyTorch file"),
        (tmp_path / "missing.safetensors", "missing", "does not exist"),
    ]
    for path, name, message in cases:
        with pytest.raises(InputError, match=message):
            pipe.load_lora_weights(path, adapter_name=name)
        assert pipe.get_active_adapters() == ["good"] and list(pipe.lora.adapters) == ["good"]
    for names, weights, message in (
        (["good", "nope"], None, "no adapter named"),
        (["good"], [0.5, 0.5], "one weight per adapter"),
        (["good", "good"], None, "twice"),
        (["good"], [float("nan")], "not a finite number"),
        (["good"], [{"unet": 1.0}], "names component 'unet'"),
    ):
        with pytest.raises(InputError, match=message):
            pipe.set_adapters(names, adapter_weights=weights)
    np.testing.assert_array_equal(image(pipe), with_good)  # still the good adapter, as before


def test_overflowing_merge_is_refused(tiny_sd3_bundle, tmp_path, kit):
    path = make_lora(tiny_sd3_bundle, kit, "huge", scale=1.0)
    with Pipeline.load(tiny_sd3_bundle) as p:
        p.load_lora_weights(path, adapter_name="huge")
        with pytest.raises(InputError, match="NaN or infinite"):
            p.set_adapters(["huge"], adapter_weights=[1e38])
        assert p.get_active_adapters() == ["huge"]


def test_bundle_without_weight_map_asks_for_a_reexport(tiny_sd3_bundle, tmp_path, kit):
    old = tmp_path / "old"
    shutil.copytree(tiny_sd3_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for comp in manifest["components"].values():
        comp.pop("weights", None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    lora = make_lora(tiny_sd3_bundle, kit, "for-old")
    with Pipeline.load(old) as p, pytest.raises(BundleError, match="Re-export it with `latentrt export`"):
        p.load_lora_weights(lora)


# -- quantized bundles -------------------------------------------------------------------------------


def test_int8_bundle_merges_into_float_and_requantizes(int8_bundle, tiny_sd3_bundle, kit):
    from latentrt.graph.quantize import dequantize_weight

    path = make_lora(tiny_sd3_bundle, kit, "small", scale=0.08)
    manifest = load_manifest(int8_bundle)
    recipes = manifest.components["transformer"].weights
    quantized = {n: r for n, r in recipes.items() if "quantized" in r}
    assert quantized and any("factor" in r for r in quantized.values())  # SmoothQuant-scaled, quantized weights are mapped
    with Pipeline.load(tiny_sd3_bundle) as fp32, Pipeline.load(int8_bundle) as int8:
        fp32_base, int8_base = image(fp32), image(int8)
        base_error = np.abs(fp32_base - int8_base).max()
        for p in (fp32, int8):
            p.load_lora_weights(path, adapter_name="small")
        effect = np.abs(image(fp32) - fp32_base)
        lora_error = np.abs(image(fp32) - image(int8)).max()
        assert lora_error <= max(3 * base_error, 5e-3)
        # the quantized weight holds the float merge (x its SmoothQuant factor) within the quantization error: half
        # a step of the bundle's scale (its stored base) plus half a step of the new one
        applied = int8._applied_values["transformer"]
        merged_fp32 = fp32._applied_values["transformer"]
        name = next(n for n in applied if n in quantized and "to_q" in n)
        scale = applied[quantized[name]["quantized"]["scale"]]
        value = dequantize_weight(applied[name], scale, quantized[name]["quantized"]["axis"])
        fp32_name = next(n for n in merged_fp32 if "to_q" in n)
        factor = np.asarray(quantized[name]["factor"]["values"], np.float32)[:, None]
        assert np.abs(value - merged_fp32[fp32_name] * factor).max() <= 1.5 * scale.max()
        # activation scales are kept: only weights and their per-channel scales change
        assert all(n.endswith(("_quantized", "_scale", ".weight")) for n in applied)
        assert not any(n.endswith("_scale") and n[: -len("_scale")] + "_quantized" not in applied for n in applied)
        int8.set_adapters([])
        np.testing.assert_array_equal(image(int8), int8_base)
        assert effect.max() > 0.01


# -- merged bundles --------------------------------------------------------------------------------


def test_merged_bundle_equals_the_swapped_adapters(tiny_sd3_bundle, tmp_path, kit):
    from latentrt.cli.main import main

    a = make_lora(tiny_sd3_bundle, kit, "a", seed=5, text=TEXT)
    b = make_lora(tiny_sd3_bundle, kit, "b", seed=6)
    out = tmp_path / "merged"
    assert main(["lora", str(tiny_sd3_bundle), "--lora", f"{a}:0.8", "--lora", str(b), "-o", str(out)]) == 0
    base, merged = load_manifest(tiny_sd3_bundle), load_manifest(out)
    changed = sorted(n for n in merged.components if merged.components[n].sha256 != base.components[n].sha256)
    assert changed == ["text_encoder", "transformer"]
    record = merged.extra["lora"]
    assert [(x["file"], x["weight"]) for x in record["adapters"]] == [("a.safetensors", 0.8), ("b.safetensors", 1.0)]
    assert record["base_sha256"]["transformer"] == base.components["transformer"].sha256
    with Pipeline.load(tiny_sd3_bundle) as p, Pipeline.load(out) as m:
        p.load_lora_weights(a, adapter_name="a")
        p.load_lora_weights(b, adapter_name="b")
        p.set_adapters(["a", "b"], adapter_weights=[0.8, 1.0])
        assert np.abs(image(p) - image(m)).max() <= 1e-6
    # `generate --lora` gives the same image from the command line
    png = tmp_path / "out.png"
    assert main(["generate", str(tiny_sd3_bundle), "-p", CALL["prompt"][0], "--steps", "2", "--height", "64", "--width", "64",
                 "--lora", f"{a}:0.8", "--lora", str(b), "-o", str(png)]) == 0
    assert png.stat().st_size > 0
    assert main(["lora", str(tiny_sd3_bundle), "--lora", f"{a}:abc", "-o", str(tmp_path / "bad")]) == 2
    assert main(["lora", str(tiny_sd3_bundle), "--lora", f"{a}:nan", "-o", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_merged_int8_bundle_quality_report(int8_bundle, tiny_sd3_bundle, tmp_path, kit):
    from latentrt.calibration.quality import compare_bundles
    from latentrt.runtime.lora.bundle import merge_lora_bundle

    path = make_lora(tiny_sd3_bundle, kit, "q", scale=0.08)
    merge_lora_bundle(tiny_sd3_bundle, tmp_path / "fp32", [(path, 1.0)])
    merge_lora_bundle(int8_bundle, tmp_path / "int8", [(path, 1.0)])
    assert "quantization" in load_manifest(tmp_path / "int8").extra
    report = compare_bundles(tmp_path / "fp32", tmp_path / "int8", prompts=["a red cat", "a blue square"], steps=2)
    assert 20 < report.mean_psnr_db < 100

"""LoRA on TensorRT: everything before the refit call here (which weights, their values, their order,
against TensorRT-RTX's real parser); the refit itself on a GPU (marked gpu)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from latentrt.runtime.backends.tensorrt.refit import onnx_initializers, prepare_refit, read_initializers, set_weights_values
from latentrt.runtime.pipeline import Pipeline


def _lora(bundle, kit, name, modules, seed):
    from latentrt.bundle.manifest import load_manifest
    from latentrt.runtime.lora.weights import ComponentWeights

    weights = ComponentWeights("transformer", load_manifest(bundle).components["transformer"].weights)
    rng = np.random.default_rng(seed)
    tensors = {}
    for module in modules:
        out_dim, in_dim = weights.param_shape(f"{module}.weight")
        tensors[f"transformer.{module}.lora_A.weight"] = rng.standard_normal((4, in_dim), dtype=np.float32) * 0.2
        tensors[f"transformer.{module}.lora_B.weight"] = rng.standard_normal((out_dim, 4), dtype=np.float32) * 0.2
    return kit.write(name, tensors)


@pytest.fixture
def merged(tiny_sd3_bundle, kit):
    """The merged transformer initializers of two adapters touching different modules (computed by
    the ONNX Runtime pipeline, which hands its engines exactly these values)."""
    a = _lora(tiny_sd3_bundle, kit, "a", ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.norm1.linear"], 1)
    b = _lora(tiny_sd3_bundle, kit, "b", ["transformer_blocks.1.ff.net.0.proj"], 2)
    with Pipeline.load(tiny_sd3_bundle) as pipe:
        pipe.load_lora_weights(a, adapter_name="a")
        values_a = dict(pipe._applied_values["transformer"])
        pipe.load_lora_weights(b, adapter_name="b")
        values_b = dict(pipe._applied_values["transformer"])
    return values_a, values_b


def test_refit_values_switch_and_restore(tiny_sd3_bundle, merged):
    path = tiny_sd3_bundle / "onnx" / "transformer.onnx"
    values_a, values_b = merged
    assert set(values_a).isdisjoint(values_b)
    base: dict = {}
    # first adapter: exactly its merged weights
    first = set_weights_values(path, [], values_a, base=base)
    assert first.keys() == values_a.keys() and all(first[n] is values_a[n] for n in values_a)
    # switching: the second adapter's weights, and the first's back to the bundle's values (read once)
    second = set_weights_values(path, values_a, values_b, base=base)
    assert second.keys() == values_a.keys() | values_b.keys()
    bundle_values = read_initializers(path, values_a)
    for name in values_a:
        np.testing.assert_array_equal(second[name], bundle_values[name])
        assert not np.array_equal(values_a[name], bundle_values[name])
    assert set(base) == set(values_a)
    # back to the base model: the whole engine from the bundle's ONNX
    assert set_weights_values(path, values_b, {}, base=base) is None
    # what TensorRT receives: in the ONNX file's order, converted to the initializers' dtypes
    plan = prepare_refit(path, second)
    order = [i.name for i in onnx_initializers(path)]
    assert [name for name, _ in plan] == [n for n in order if n in second]
    assert all(array.dtype == np.float32 and array.flags.c_contiguous for _, array in plan)


def test_lora_weights_are_refittable_in_the_real_parser(tiny_sd3_bundle, merged):
    """Every initializer a LoRA changes is one TensorRT-RTX's parser holds as a named weight."""
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed: pip install 'latentrt[tensorrt-rtx]'")
    from latentrt.engines.build import refittable_weights
    from latentrt.engines.library import load_library, make_logger

    rtx = load_library("tensorrt-rtx")
    path = tiny_sd3_bundle / "onnx" / "transformer.onnx"
    logger = make_logger(rtx)
    network = rtx.module.Builder(logger).create_network(rtx.network_flags)
    parser = rtx.module.OnnxParser(network, logger)
    assert parser.parse_from_file(str(path))
    weights = refittable_weights(network, path, logger)
    values_a, values_b = merged
    plan = prepare_refit(path, {**values_a, **values_b}, refittable=weights)  # raises if one is not refittable
    assert {name for name, _ in plan} == values_a.keys() | values_b.keys()


@pytest.mark.gpu
def test_tensorrt_lora_matches_onnxruntime_and_restores(tiny_sd3_bundle, kit, tmp_path):
    """Refittable engines take adapters through the refitter: the images equal ONNX Runtime's with
    the same adapters (TF32 tolerance), and the bundle's weights come back exactly."""
    from latentrt.engines import BuildConfig, build_engines

    target, ccs = _gpu_target()
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sd3_bundle, bundle, ignore=shutil.ignore_patterns("engines"))
    build_engines(bundle, BuildConfig(target=target, compute_capabilities=ccs, batch=(1, 1, 2), weights="refittable"))
    a = _lora(bundle, kit, "a", ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.norm1.linear"], 1)
    b = _lora(bundle, kit, "b", ["transformer_blocks.1.ff.net.0.proj"], 2)
    call = dict(prompt=["a red cat"], num_inference_steps=3, height=64, width=64, guidance_scale=4.0)
    latents = np.random.default_rng(0).standard_normal((1, 16, 8, 8), dtype=np.float32)
    with Pipeline.load(bundle, backend="tensorrt") as trt, Pipeline.load(bundle) as ort:
        base = trt(**call, latents=latents).pixels
        for pipe in (trt, ort):
            pipe.load_lora_weights(a, adapter_name="a")
            pipe.load_lora_weights(b, adapter_name="b")
        for names, weights in ((["a"], [1.0]), (["a", "b"], [0.7, 0.5]), (["b"], [1.0])):
            for pipe in (trt, ort):
                pipe.set_adapters(names, adapter_weights=weights)
            assert np.abs(trt(**call, latents=latents).pixels - ort(**call, latents=latents).pixels).max() <= 5e-3
        trt.set_adapters([])
        np.testing.assert_array_equal(trt(**call, latents=latents).pixels, base)


def _gpu_target():
    try:
        from latentrt.engines.library import current_compute_capability, is_available, load_cudart, load_library

        err, count = load_cudart().cudaGetDeviceCount()
    except Exception:  # noqa: BLE001 - no cuda-python or no driver
        pytest.skip("no CUDA GPU with cuda-python is usable here")
    if int(err) != 0 or count < 1:
        pytest.skip("no CUDA GPU is visible")
    if is_available("tensorrt"):
        return "tensorrt", ()
    if is_available("tensorrt-rtx") and current_compute_capability() in load_library("tensorrt-rtx").compute_capability_names():
        return "tensorrt-rtx", (current_compute_capability(),)
    pytest.skip("neither NVIDIA TensorRT nor a TensorRT-RTX that targets this GPU is installed")

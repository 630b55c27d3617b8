"""The TensorRT backend: device-free planning and engine selection here; running engines on a GPU (marked gpu)."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest

from latentrt.engines.cache import EngineSpec, write_engine
from latentrt.engines.profiles import resolve_profiles
from latentrt.errors import BundleError, InputError
from latentrt.bundle.manifest import load_manifest
from latentrt.runtime.backends.tensorrt.engine import (
    BufferPlan,
    check_feed_shapes,
    load_engines,
    numpy_dtype,
    plan_buffers,
    resolve_shape,
    select_engine,
    tensor_nbytes,
)


@pytest.fixture(scope="module")
def manifest(tiny_sd3_bundle):
    return load_manifest(tiny_sd3_bundle)


# ---------------------------------------------------------------------------------------------
# Device-free
# ---------------------------------------------------------------------------------------------


def test_resolve_shape():
    assert resolve_shape(("batch", 16, "h", "w"), {"batch": 2, "h": 8, "w": 6}) == (2, 16, 8, 6)
    with pytest.raises(InputError, match="axis 'w' .* has no size"):
        resolve_shape(("batch", "w"), {"batch": 2})


def test_tensor_nbytes():
    assert tensor_nbytes((2, 77), "int64") == 2 * 77 * 8
    assert tensor_nbytes((4, 3, 8, 8), "float16") == 4 * 3 * 8 * 8 * 2
    assert tensor_nbytes((0, 5), "float32") == 0
    with pytest.raises(InputError, match="dtype 'complex64' has no known size"):
        tensor_nbytes((1,), "complex64")
    with pytest.raises(InputError, match="unresolved"):
        tensor_nbytes((-1, 5), "float32")


def test_plan_buffers_rounds_up_to_the_alignment():
    plans = plan_buffers({"a": (3,), "b": (64,), "c": (65,), "d": (0,)}, {"a": "float32", "b": "float32", "c": "float32", "d": "int64"})
    assert {n: p.nbytes for n, p in plans.items()} == {"a": 256, "b": 256, "c": 512, "d": 256}
    assert plans["c"] == BufferPlan("c", "float32", (65,), 512)
    with pytest.raises(InputError, match="no dtype"):
        plan_buffers({"a": (1,)}, {})


def test_plan_buffers_for_the_tiny_sd3_transformer_profile(manifest):
    profile = resolve_profiles(manifest)["transformer"]  # max: batch 8, latent 96x96, context 589
    comp = manifest.components["transformer"]
    axes = {name: a.max for name, a in profile.axes.items()}
    shapes = {s.name: resolve_shape(s.shape, axes) for s in comp.inputs}
    shapes["sample"] = shapes["hidden_states"]  # what the engine reports for the output at max inputs
    plans = plan_buffers(shapes, {s.name: s.dtype for s in (*comp.inputs, *comp.outputs)})
    assert shapes == {**profile.max_shapes(), "sample": (8, 16, 96, 96)}
    assert plans["hidden_states"].nbytes == 8 * 16 * 96 * 96 * 4
    assert plans["encoder_hidden_states"].nbytes == 8 * 589 * 96 * 4
    assert plans["pooled_projections"].nbytes == 2560  # 8 * 80 * 4
    assert plans["timestep"].nbytes == 256  # 32 bytes, rounded up
    assert plans["sample"].nbytes == plans["hidden_states"].nbytes


def test_check_feed_shapes():
    profile = {"x": ((1, 16, 4, 4), (2, 16, 16, 16), (4, 16, 32, 32)), "t": ((1,), (2,), (4,))}
    check_feed_shapes({"x": (3, 16, 8, 32), "t": (3,)}, profile)
    with pytest.raises(InputError, match="missing input 't'"):
        check_feed_shapes({"x": (3, 16, 8, 32)}, profile)
    with pytest.raises(InputError, match="expected rank 4"):
        check_feed_shapes({"x": (3, 16, 8), "t": (3,)}, profile)
    with pytest.raises(InputError) as err:
        check_feed_shapes({"x": (3, 16, 64, 32), "t": (3,)}, profile)
    assert "dimension 2 is 64, outside the engine's profile 4..32" in str(err.value) and "latentrt build" in str(err.value)


def test_numpy_dtype():
    assert numpy_dtype("float32") == np.float32 and numpy_dtype("int64") == np.int64 and numpy_dtype("bool") == np.bool_
    if importlib.util.find_spec("ml_dtypes"):
        assert numpy_dtype("bfloat16").itemsize == 2
    with pytest.raises(InputError):
        numpy_dtype("float4_e2m1fn_x")


def _fake_engine(bundle, manifest, component, *, ccs=(), created="2026-01-01T00:00:00+00:00", sha=None, opt_level=3):
    spec = EngineSpec(
        component=component,
        onnx_sha256=sha or manifest.components[component].sha256,
        library="tensorrt-rtx",
        library_version="1.7.1.116",
        compute_capabilities=tuple(ccs),
        profile={},
        flags={"opt_level": opt_level},
    )
    return write_engine(bundle, spec, b"x" * 16, build_seconds=0.1, created=created)


def test_select_engine_picks_the_newest_current_one(manifest, tmp_path):
    old = _fake_engine(tmp_path, manifest, "vae_decoder", created="2026-01-01T00:00:00+00:00", opt_level=0)
    new = _fake_engine(tmp_path, manifest, "vae_decoder", created="2026-01-02T00:00:00+00:00", opt_level=1)
    _fake_engine(tmp_path, manifest, "vae_decoder", created="2026-01-03T00:00:00+00:00", sha="00" * 32)  # stale ONNX
    assert select_engine(tmp_path, manifest, "vae_decoder") == new
    assert old != new


def test_select_engine_prefers_the_gpu_compute_capability(manifest, tmp_path):
    for_86 = _fake_engine(tmp_path, manifest, "vae_decoder", ccs=("8.6",), created="2026-01-01T00:00:00+00:00")
    for_89 = _fake_engine(tmp_path, manifest, "vae_decoder", ccs=("8.9",), created="2026-01-02T00:00:00+00:00")
    assert select_engine(tmp_path, manifest, "vae_decoder", compute_capability="8.6") == for_86
    assert select_engine(tmp_path, manifest, "vae_decoder", compute_capability="8.9") == for_89
    portable = _fake_engine(tmp_path, manifest, "vae_decoder", ccs=(), created="2026-01-03T00:00:00+00:00")
    assert select_engine(tmp_path, manifest, "vae_decoder", compute_capability="8.6") == for_86  # built for this GPU: first
    assert select_engine(tmp_path, manifest, "vae_decoder", compute_capability="12.0") == portable  # RTX's default targets


def test_missing_engines_are_reported_before_any_cuda_call(manifest, tmp_path):
    with pytest.raises(BundleError, match="no TensorRT engine for component 'text_encoder'.*latentrt build"):
        load_engines(tmp_path, manifest)
    _fake_engine(tmp_path, manifest, "text_encoder")
    with pytest.raises(BundleError, match="component 'text_encoder_2'"):
        load_engines(tmp_path, manifest)


def test_engine_needs_its_library(tmp_path):
    if importlib.util.find_spec("tensorrt"):
        pytest.skip("NVIDIA TensorRT is installed here")
    from latentrt.runtime.backends.tensorrt.engine import TensorRTEngine

    with pytest.raises(InputError, match="pip install tensorrt cuda-python"):
        TensorRTEngine(tmp_path / "x.engine", (), (), target="tensorrt")


# ---------------------------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------------------------


def _gpu_or_skip():
    try:
        from latentrt.engines.library import load_cudart

        cudart = load_cudart()
    except InputError:
        pytest.skip("cuda-python is not installed: pip install cuda-python")
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        pytest.skip("no CUDA GPU is visible")
    return cudart


@pytest.fixture(scope="session")
def gpu_target():
    """(target, compute capabilities) that can build and run engines here, or a skip; set up before the bundle export."""
    _gpu_or_skip()
    return _build_target_or_skip()


def _build_target_or_skip():
    """A library that can build and run engines on this GPU: NVIDIA TensorRT, or TensorRT-RTX on a GPU it supports."""
    from latentrt.engines.library import current_compute_capability, is_available, load_library

    if is_available("tensorrt"):
        return "tensorrt", ()
    if is_available("tensorrt-rtx"):
        cc = current_compute_capability()
        if cc in load_library("tensorrt-rtx").compute_capability_names():
            return "tensorrt-rtx", (cc,)
        pytest.skip(f"TensorRT-RTX cannot target this GPU (compute capability {cc}) and NVIDIA TensorRT is not installed")
    pytest.skip("neither NVIDIA TensorRT nor TensorRT-RTX is installed")


@pytest.mark.gpu
def test_device_buffers_round_trip():
    _gpu_or_skip()
    from latentrt.runtime.backends.tensorrt.engine import DeviceBuffers

    data = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    ids = np.arange(2 * 77, dtype=np.int64).reshape(2, 77)
    plans = plan_buffers({"x": (4, 5, 7), "y": (4, 5, 7), "ids": (8, 77)}, {"x": "float32", "y": "float32", "ids": "int64"})
    with DeviceBuffers(plans) as buffers:
        assert buffers.address("x") % 256 == 0 and buffers.address("x") != buffers.address("ids")
        buffers.upload("x", data)
        buffers.upload("ids", ids)
        out_x = buffers.download("x", data.shape, np.float32)
        out_ids = buffers.download("ids", ids.shape, np.int64)
        buffers.synchronize()
        np.testing.assert_array_equal(out_x, data)
        np.testing.assert_array_equal(out_ids, ids)
        buffers.copy_within("y", "x", data.nbytes)
        out_y = buffers.download("y", data.shape, np.float32)
        buffers.synchronize()
        np.testing.assert_array_equal(out_y, data)
        with pytest.raises(InputError, match="do not fit its buffer"):
            buffers.upload("x", np.zeros((8, 5, 7), np.float32))  # 1120 bytes > 768 planned


@pytest.mark.gpu
def test_engines_match_onnxruntime(gpu_target, tiny_sd3_bundle, tmp_path):
    target, ccs = gpu_target
    from latentrt.engines import BuildConfig, build_engines
    from latentrt.runtime.backends.onnxruntime.engine import OnnxRuntimeEngine

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sd3_bundle, bundle, ignore=shutil.ignore_patterns("engines"))
    manifest = load_manifest(bundle)
    build_engines(bundle, BuildConfig(target=target, compute_capabilities=ccs, batch=(1, 1, 2)))
    engines = load_engines(bundle, manifest)
    rng = np.random.default_rng(0)
    feeds = {
        "text_encoder": {"input_ids": rng.integers(0, 1000, (2, 77), dtype=np.int64)},
        "text_encoder_3": {"input_ids": rng.integers(0, 1000, (2, 40), dtype=np.int64)},
        "transformer": {
            "hidden_states": rng.standard_normal((2, 16, 12, 8), dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77 + 40, 96), dtype=np.float32),
            "pooled_projections": rng.standard_normal((2, 80), dtype=np.float32),
            "timestep": np.array([500.0, 20.0], np.float32),
        },
        "vae_decoder": {"latent_sample": rng.standard_normal((1, 16, 12, 8), dtype=np.float32)},
    }
    try:
        for name, feed in feeds.items():
            comp = manifest.components[name]
            reference = OnnxRuntimeEngine(bundle / comp.file, comp.inputs, comp.outputs)(feed)
            got = engines[name](feed)
            for out, ref in reference.items():
                assert got[out].shape == ref.shape, (name, out)
                rel = np.linalg.norm(got[out] - ref) / np.linalg.norm(ref)
                assert rel < 5e-3, (name, out, rel)  # TF32 matmuls may be on for fp32 networks
    finally:
        for engine in engines.values():
            engine.close()


@pytest.mark.gpu
def test_pipeline_on_tensorrt_matches_onnxruntime(gpu_target, tiny_sd3_bundle, tmp_path):
    target, ccs = gpu_target
    from latentrt.engines import BuildConfig, build_engines
    from latentrt.runtime.pipeline import Pipeline

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sd3_bundle, bundle, ignore=shutil.ignore_patterns("engines"))
    build_engines(bundle, BuildConfig(target=target, compute_capabilities=ccs, batch=(1, 1, 1)))
    kwargs = dict(prompt="a red circle", num_inference_steps=2, guidance_scale=4.0, height=64, width=64, seed=0)
    reference = Pipeline.load(bundle, "onnxruntime")(**kwargs).pixels
    pixels = Pipeline.load(bundle, "tensorrt")(**kwargs).pixels
    assert pixels.shape == reference.shape
    assert np.abs(pixels - reference).max() < 2e-2


@pytest.mark.gpu
def test_device_loop_matches_the_host_loop(gpu_target, tiny_sd3_bundle, tmp_path):
    """Every step on the GPU (step engine; a CUDA graph from step 2, or its fallback when the library
    cannot capture) gives the numpy loop's image."""
    target, ccs = gpu_target
    from latentrt.engines import BuildConfig, build_engines
    from latentrt.runtime.pipeline import Pipeline
    from latentrt.runtime.backends.tensorrt.loop import ComponentDeviceLoop, DeviceDenoiser

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_sd3_bundle, bundle, ignore=shutil.ignore_patterns("engines"))
    build_engines(bundle, BuildConfig(target=target, compute_capabilities=ccs, batch=(1, 1, 2)))
    kwargs = dict(prompt=["a red circle", "a blue square"], num_inference_steps=4, guidance_scale=4.0, height=64, width=64, seed=0)
    with Pipeline.load(bundle, "tensorrt") as pipe:
        pipe(**kwargs)
        loop = pipe._device_denoiser
        assert isinstance(loop, ComponentDeviceLoop) and isinstance(loop.last, DeviceDenoiser)
        on_device = pipe(**kwargs).pixels
        run = loop.last_run
        assert run.graph in ("replayed", "library"), run.graph  # a CUDA graph was really used
        if run.graph == "replayed":
            assert run.graph_launches == 3  # steps 2..4
        assert run.synchronizations == 1 and len(run.step_times) == 4 and all(t > 0 for t in run.step_times)
        loop.last.graphs = False
        without_graph = pipe(**kwargs).pixels
        assert loop.last_run.graph == "off" and loop.last_run.graph_launches == 0
        pipe._device_denoiser = False  # the numpy loop, same engines
        on_host = pipe(**kwargs).pixels
    np.testing.assert_allclose(on_device, on_host, atol=1e-4)
    np.testing.assert_allclose(without_graph, on_host, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# What the pipeline takes from the engines: chunking by their profiles, close(), the bench wrapper
# ---------------------------------------------------------------------------------------------


class _Limited:
    """A real ONNX Runtime engine that takes at most `max_batch` rows, as an engine built with a
    narrower profile than the manifest's range (e.g. `latentrt build --batch 1:1:2`)."""

    def __init__(self, engine, max_batch, calls):
        self.engine, self.max_batch, self.calls = engine, max_batch, calls
        self.inputs, self.outputs = engine.inputs, engine.outputs
        self.closed = False

    def __call__(self, feeds):
        rows = next(iter(feeds.values())).shape[0]
        if rows > self.max_batch:
            raise InputError(f"batch {rows} is outside the engine's profile (max {self.max_batch})")
        self.calls.append(rows)
        return self.engine(feeds)

    def close(self):
        self.closed = True
        self.engine.close()


def test_chunking_follows_the_engines_profiles(tiny_sd3_bundle):
    """Engines built with --batch 1:1:2 (text encoders and denoiser 4 rows with guidance, VAE 2): a
    3-image call runs as 2 + 1 images, each image as it would alone."""
    from latentrt.runtime.pipeline import Pipeline

    plain = Pipeline.load(tiny_sd3_bundle, "onnxruntime")
    calls = {}
    limits = {name: (2 if name == "vae_decoder" else 4) for name in plain.manifest.components}
    limited = Pipeline(plain.bundle, plain.manifest, {n: _Limited(e, limits[n], calls.setdefault(n, [])) for n, e in plain.engines.items()})
    kwargs = dict(prompt=["a", "b", "c"], num_inference_steps=2, guidance_scale=4.0, height=64, width=64, seed=3)
    assert limited._images_per_call(cfg=True) == 2 and plain._images_per_call(cfg=True) == 4
    pixels = limited(**kwargs).pixels
    assert calls["vae_decoder"] == [2, 1] and set(calls["transformer"]) == {4, 2}
    reference = Pipeline.load(tiny_sd3_bundle, "onnxruntime")(**kwargs).pixels
    np.testing.assert_allclose(pixels, reference, atol=1e-5)
    with limited:
        pass
    assert all(e.closed for e in limited.engines.values())


def test_pipeline_close_releases_the_engines(tiny_sd3_bundle):
    from latentrt.runtime.pipeline import Pipeline

    with Pipeline.load(tiny_sd3_bundle, "onnxruntime") as pipe:
        pipe("a red circle", num_inference_steps=1, height=64, width=64, seed=0)
    assert all(engine._session is None for engine in pipe.engines.values())


def test_bench_wrapper_forwards_the_device_loop(tiny_sd3_bundle):
    """`latentrt bench` wraps engines to record shapes; the pipeline must still see the denoiser's
    device loop (TensorRT times the device loop and its CUDA graph, not a numpy host loop)."""
    from latentrt.bench.worker import _Recorder
    from latentrt.runtime.pipeline import Pipeline

    class WithLoop(_Limited):
        def device_loop(self, latent_input, velocity_output):
            return ("device loop", latent_input, velocity_output)

    plain = Pipeline.load(tiny_sd3_bundle, "onnxruntime")
    engines = {n: _Recorder(WithLoop(e, 8, []), {}) for n, e in plain.engines.items()}
    pipe = Pipeline(plain.bundle, plain.manifest, engines)
    schedule = pipe.family.schedule(2, 8, 8)
    latents = np.zeros((1, 16, 8, 8), np.float32)
    loop = pipe._device_loop(schedule, latents, lambda x, t: pipe.family.denoiser_feeds(x, t, {}, 1.0))
    assert loop == ("device loop", "hidden_states", "sample")
    assert engines["transformer"].max_batch == 8


def _gpu_bundle(gpu_target, source_bundle, tmp_path, **build):
    """A copy of `source_bundle` with engines built for this GPU."""
    from latentrt.engines import BuildConfig, build_engines

    target, ccs = gpu_target
    bundle = tmp_path / "bundle"
    shutil.copytree(source_bundle, bundle, ignore=shutil.ignore_patterns("engines"))
    build_engines(bundle, BuildConfig(target=target, compute_capabilities=ccs, **build))
    return bundle


def _compare(bundle, atol, **kwargs):
    from latentrt.runtime.pipeline import Pipeline

    with Pipeline.load(bundle, "onnxruntime") as pipe:
        reference = pipe(**kwargs).pixels
    with Pipeline.load(bundle, "tensorrt") as pipe:
        pixels = pipe(**kwargs).pixels
        run = getattr(pipe._device_denoiser, "last_run", None)
    assert pixels.shape == reference.shape
    assert np.abs(pixels - reference).max() < atol, np.abs(pixels - reference).max()
    return run


@pytest.mark.gpu
@pytest.mark.parametrize(
    "preset, guidance, device_loop",
    [("tiny-sd3", 4.0, True), ("tiny-sd3", 1.0, True), ("tiny-flux", 3.5, True), ("tiny-pixart", 4.0, False), ("tiny-sd15", 7.5, False), ("tiny-sdxl", 5.0, False)],
    ids=["sd3", "sd3-no-guidance", "flux-packed", "pixart", "unet-sd15", "unet-sdxl"],
)
def test_families_on_tensorrt_match_onnxruntime(gpu_target, preset_bundle, tmp_path, preset, guidance, device_loop):
    """Every family: TensorRT engines vs ONNX Runtime on the same latents. SD3 and Flux run the
    device loop (with and without guidance: the no-guidance step engine; Flux: packed latents), the
    others the numpy loop over TensorRT engines."""
    bundle = _gpu_bundle(gpu_target, preset_bundle(preset), tmp_path, batch=(1, 1, 2), opt_level=1)
    run = _compare(bundle, 2e-2, prompt="a red circle", num_inference_steps=3, guidance_scale=guidance, height=64, width=64, seed=0)
    assert (run is not None) == device_loop
    if device_loop:
        assert run.steps == 3 and run.synchronizations == 1


@pytest.mark.gpu
def test_fp16_engines_match_onnxruntime(gpu_target, tiny_sd3_dir, tmp_path):
    from latentrt.export.pipeline import ExportConfig, export_pipeline

    source = tmp_path / "fp16"
    export_pipeline(tiny_sd3_dir, source, ExportConfig(precision="fp16"))
    bundle = _gpu_bundle(gpu_target, source, tmp_path, batch=(1, 1, 1))
    _compare(bundle, 3e-2, prompt="a red circle", num_inference_steps=3, guidance_scale=4.0, height=64, width=64, seed=0)


@pytest.mark.gpu
def test_chunks_follow_the_engine_profile(gpu_target, tiny_sd3_bundle, tmp_path):
    """Engines built for one image per call (--batch 1:1:1): a 3-image call runs as three calls."""
    bundle = _gpu_bundle(gpu_target, tiny_sd3_bundle, tmp_path, batch=(1, 1, 1))
    from latentrt.runtime.pipeline import Pipeline

    with Pipeline.load(bundle, "tensorrt") as pipe:
        assert pipe._images_per_call(cfg=True) == 1
        steps = []
        out = pipe(["a", "b", "c"], num_inference_steps=2, guidance_scale=4.0, height=64, width=64, seed=1, callback=lambda i, n: steps.append(i))
    assert out.pixels.shape == (3, 64, 64, 3) and steps == [1, 2] * 3


@pytest.mark.gpu
def test_two_pipelines_then_close_return_device_memory(gpu_target, tiny_sd3_bundle, tmp_path):
    from latentrt.runtime.backends.tensorrt.device import device_memory_in_use
    from latentrt.runtime.pipeline import Pipeline

    bundle = _gpu_bundle(gpu_target, tiny_sd3_bundle, tmp_path, batch=(1, 1, 2))
    kwargs = dict(prompt="a red circle", num_inference_steps=2, guidance_scale=4.0, height=64, width=64, seed=0)
    with Pipeline.load(bundle, "tensorrt") as warm:  # CUDA context, libraries, kernels
        warm(**kwargs)
    baseline = device_memory_in_use()
    first, second = Pipeline.load(bundle, "tensorrt"), Pipeline.load(bundle, "tensorrt")
    a, b = first(**kwargs).pixels, second(**kwargs).pixels
    np.testing.assert_array_equal(a, b)
    assert device_memory_in_use() > baseline
    first.close()
    second.close()
    assert abs(device_memory_in_use() - baseline) <= 8 << 20
    with pytest.raises(Exception, match="closed"):
        first(**kwargs)


@pytest.mark.gpu
@pytest.mark.slow
def test_full_size_transformer_loads_with_its_memory_report(gpu_target, tmp_path):
    """The SD3-medium-config MMDiT (2B parameters, fp16): build for this GPU, load, report memory, run 1024x1024.

    Needs the ONNX from `python benchmarks/sd3_medium_export_build.py DIR` in LATENTRT_FULL_SIZE_DIR
    (about 80 s and 13 GB of RAM to export); skipped without it.
    """
    import os
    from pathlib import Path

    from latentrt.bundle.manifest import TensorSpec
    from latentrt.engines.build import build_serialized_engine
    from latentrt.engines.library import load_library
    from latentrt.runtime.backends.tensorrt.engine import TensorRTEngine

    folder = os.environ.get("LATENTRT_FULL_SIZE_DIR")
    if not folder or not (Path(folder) / "transformer.onnx").is_file():
        pytest.skip("set LATENTRT_FULL_SIZE_DIR to a folder written by benchmarks/sd3_medium_export_build.py")
    target, ccs = gpu_target
    shapes = {
        "hidden_states": ((1, 16, 64, 64), (2, 16, 128, 128), (2, 16, 128, 128)),
        "encoder_hidden_states": ((1, 77, 4096), (2, 333, 4096), (2, 333, 4096)),
        "pooled_projections": ((1, 2048), (2, 2048), (2, 2048)),
        "timestep": ((1,), (2,), (2,)),
    }
    built = build_serialized_engine(load_library(target), Path(folder) / "transformer.onnx", shapes, compute_capabilities=ccs)
    path = tmp_path / "transformer.engine"
    path.write_bytes(bytes(built.data))
    inputs = (
        TensorSpec("hidden_states", "float16", ("batch", 16, "h", "w")),
        TensorSpec("encoder_hidden_states", "float16", ("batch", "context", 4096)),
        TensorSpec("pooled_projections", "float16", ("batch", 2048)),
        TensorSpec("timestep", "float16", ("batch",)),
    )
    outputs = (TensorSpec("sample", built.network.outputs[0].dtype, ("batch", 16, "h", "w")),)
    with TensorRTEngine(path, inputs, outputs, target=target) as engine:
        memory = engine.memory
        print(f"full-size transformer: weights {memory.weights >> 20} MiB, activations {memory.activations >> 20} MiB, I/O {memory.io >> 20} MiB")
        assert memory.weights > 3 << 30 and memory.activations > 0 and memory.io > 0
        rng = np.random.default_rng(0)
        feeds = {
            "hidden_states": rng.standard_normal((2, 16, 128, 128)).astype(np.float16),
            "encoder_hidden_states": rng.standard_normal((2, 333, 4096)).astype(np.float16),
            "pooled_projections": rng.standard_normal((2, 2048)).astype(np.float16),
            "timestep": np.array([500, 500], np.float16),
        }
        out = engine(feeds)["sample"]
        assert out.shape == (2, 16, 128, 128) and np.isfinite(out.astype(np.float32)).all()
        assert engine.resources.peak_arena_bytes <= memory.activations + (1 << 20)

"""Real TensorRT-RTX builds of the tiny-sd3 bundle (ahead of time, no GPU needed).

Each build of a tiny component takes about a second on a 2-core machine.
"""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper

from latentrt.engines import BuildConfig, build_engines, build_serialized_engine, inspect_engines, parse_image_size, resolve_profiles
from latentrt.errors import BuildError, InputError
from latentrt.bundle.manifest import load_manifest, sha256_file

pytestmark = pytest.mark.usefixtures("rtx")

COMPONENTS = ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder"]


@pytest.fixture(scope="module", params=["8.6", "8.9"])
def built(request, engines_bundle):
    """Every component built for one compute capability, with the manifest's shape ranges."""
    config = BuildConfig(compute_capabilities=(request.param,))
    results = build_engines(engines_bundle, config)
    return request.param, config, {r.component: r for r in results}


@pytest.mark.parametrize("component", COMPONENTS)
def test_every_component_builds(built, manifest, component):
    cc, _, results = built
    result = results[component]
    comp = manifest.components[component]
    assert result.status == "built"
    assert [(t.name, t.dtype) for t in result.network.inputs] == [(s.name, s.dtype) for s in comp.inputs]
    assert [(t.name, t.dtype) for t in result.network.outputs] == [(s.name, s.dtype) for s in comp.outputs]
    assert result.network.num_layers > 0
    assert result.engine.is_file() and result.engine.stat().st_size == result.record.engine_bytes > 100_000
    assert result.record.spec.compute_capabilities == (cc,)
    assert result.record.spec.library == "tensorrt-rtx" and result.record.spec.onnx_sha256 == comp.sha256
    assert result.record.build_seconds > 0
    meta = json.loads(result.engine.with_suffix(".json").read_text())
    assert meta["key"] == result.record.key and meta["engine_bytes"] == result.record.engine_bytes
    assert meta["inputs"] == [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in comp.inputs]


def test_dynamic_dims_stay_dynamic(built):
    _, _, results = built
    hidden = {t.name: t.shape for t in results["transformer"].network.inputs}
    assert hidden["hidden_states"] == (-1, 16, -1, -1)
    assert hidden["encoder_hidden_states"] == (-1, -1, 96)


def test_second_build_is_cached(built, engines_bundle):
    _, config, results = built
    mtimes = {name: r.engine.stat().st_mtime_ns for name, r in results.items()}
    again = build_engines(engines_bundle, config)
    assert [r.status for r in again] == ["cached"] * len(COMPONENTS)
    for r in again:
        assert r.record == results[r.component].record
        assert r.engine.stat().st_mtime_ns == mtimes[r.component]
        assert r.network is None


def test_inspect_lists_current_engines(built, engines_bundle):
    _, config, results = built
    statuses = [s for s in inspect_engines(engines_bundle, config) if s.record and s.record.key == results[s.component].record.key]
    assert sorted(s.component for s in statuses) == COMPONENTS
    assert {s.status for s in statuses} == {"current"}


def test_flag_changes_rebuild(bundle_copy):
    base = BuildConfig(compute_capabilities=("8.9",), components=("vae_decoder",), opt_level=0)
    [first] = build_engines(bundle_copy, base)
    [same] = build_engines(bundle_copy, base)
    [other_level] = build_engines(bundle_copy, BuildConfig.from_dict({**base.to_dict(), "opt_level": 1}))
    [other_workspace] = build_engines(bundle_copy, BuildConfig.from_dict({**base.to_dict(), "workspace": 1 << 32}))
    [other_size] = build_engines(bundle_copy, BuildConfig.from_dict({**base.to_dict(), "image_size": [[64, 64], [64, 64], [64, 64]]}))
    assert (first.status, same.status, other_level.status, other_workspace.status, other_size.status) == (
        "built",
        "cached",
        "built",
        "built",
        "built",
    )
    assert len({first.engine, other_level.engine, other_workspace.engine, other_size.engine}) == 4
    assert other_size.record.spec.profile["shapes"]["latent_sample"]["max"] == [4, 16, 8, 8]

    [rebuilt] = build_engines(bundle_copy, BuildConfig.from_dict({**base.to_dict(), "reuse": "rebuild"}))
    assert rebuilt.status == "built" and rebuilt.engine == first.engine

    statuses = inspect_engines(bundle_copy, BuildConfig.from_dict({**base.to_dict(), "opt_level": 1}))
    by_file = {s.path.name: s for s in statuses}
    assert by_file[other_level.engine.name].status == "current"
    assert by_file[first.engine.name].status == "stale"
    assert "flags.opt_level: 0 -> 1" in by_file[first.engine.name].reasons[0]


def test_onnx_change_makes_engine_stale(bundle_copy):
    config = BuildConfig(compute_capabilities=("8.9",), components=("text_encoder_3", "vae_decoder"), opt_level=0)
    old = {r.component: r for r in build_engines(bundle_copy, config)}

    # Re-export stand-in: change the VAE's ONNX file and record its new sha256 in the manifest.
    path = bundle_copy / "onnx" / "vae_decoder.onnx"
    model = onnx.load(path)
    model.doc_string = "re-exported"
    onnx.save(model, path)
    raw = json.loads((bundle_copy / "manifest.json").read_text())
    raw["components"]["vae_decoder"]["sha256"] = sha256_file(path)
    (bundle_copy / "manifest.json").write_text(json.dumps(raw))

    statuses = {s.component: s for s in inspect_engines(bundle_copy)}
    assert statuses["text_encoder_3"].status == "current"
    assert statuses["vae_decoder"].status == "stale"
    assert "the ONNX file changed since the build" in statuses["vae_decoder"].reasons[0]

    new = {r.component: r for r in build_engines(bundle_copy, config)}
    assert new["text_encoder_3"].status == "cached" and new["vae_decoder"].status == "built"
    assert new["vae_decoder"].engine != old["vae_decoder"].engine


def test_small_workspace_is_explained(bundle_copy):
    # The VAE at 768x768, batch 4, needs more than 64 MiB; TensorRT-RTX reports "OutOfMemory".
    with pytest.raises(BuildError) as err:
        build_engines(bundle_copy, BuildConfig(compute_capabilities=("8.9",), components=("vae_decoder",), workspace=1 << 26, opt_level=0))
    assert "OutOfMemory" in str(err.value) and "raise the workspace limit" in str(err.value)


def test_default_compute_capabilities(bundle_copy):
    [result] = build_engines(bundle_copy, BuildConfig(components=("text_encoder_3",), opt_level=0))
    assert result.status == "built" and result.record.spec.compute_capabilities == ()


def test_out_of_range_requests_fail_before_any_build(bundle_copy):
    with pytest.raises(InputError, match="batch max of at most 4"):
        build_engines(bundle_copy, BuildConfig(batch=(1, 1, 5)))
    with pytest.raises(InputError, match="not a multiple of 16"):
        build_engines(bundle_copy, BuildConfig(image_size=parse_image_size("120x120")))
    with pytest.raises(InputError, match="cannot target compute capability 9.0"):
        build_engines(bundle_copy, BuildConfig(compute_capabilities=("9.0",)))
    with pytest.raises(InputError, match="unknown component"):
        build_engines(bundle_copy, BuildConfig(components=("unet",)))
    assert not (bundle_copy / "engines").exists()


def test_builder_errors_are_surfaced(rtx, engines_bundle, manifest):
    # Bypass latentrt's own checks: the builder itself rejects a batch that differs between inputs.
    shapes = dict(resolve_profiles(manifest)["transformer"].shapes)
    shapes["timestep"] = ((1,), (1,), (8,))
    with pytest.raises(BuildError) as err:
        build_serialized_engine(rtx, engines_bundle / "onnx" / "transformer.onnx", shapes, component="transformer", opt_level=0)
    message = str(err.value)
    assert "transformer: tensorrt_rtx" in message and "could not build an engine" in message
    assert "Dimensions with name batch must be equal" in message


def test_turing_rejects_fp32_matmul(bundle_copy):
    # TensorRT-RTX 1.7 has no FP32 GEMM for SM75; the VAE's attention MatMul is fp32 here.
    with pytest.raises(BuildError) as err:
        build_engines(bundle_copy, BuildConfig(compute_capabilities=("7.5",), components=("vae_decoder",), opt_level=0))
    assert "SM75" in str(err.value) and "MatMul" in str(err.value)
    assert not list(bundle_copy.glob("engines/*.json"))


def test_parser_errors_name_the_node(rtx, tmp_path):
    nodes = [
        helper.make_node("Bogus", ["x"], ["y"], name="my_bogus_node", domain="com.example"),
        helper.make_node("Relu", ["y"], ["z"], name="relu0"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])],
    )
    path = tmp_path / "bogus.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)]), path)
    with pytest.raises(BuildError) as err:
        build_serialized_engine(rtx, path, {"x": ((1, 4), (1, 4), (2, 4))}, component="bogus")
    message = str(err.value)
    assert "ONNX parser rejected" in message and "node 0 (Bogus 'my_bogus_node')" in message and "INVALID_NODE" in message


def test_network_is_checked_against_the_manifest(bundle_copy):
    raw = json.loads((bundle_copy / "manifest.json").read_text())
    raw["components"]["vae_decoder"]["inputs"][0]["dtype"] = "float16"
    (bundle_copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BuildError) as err:
        build_engines(bundle_copy, BuildConfig(compute_capabilities=("8.9",), components=("vae_decoder",)))
    assert "input 'latent_sample' is float32 in the network, float16 in the manifest" in str(err.value)


def test_progress_events(bundle_copy):
    events = []
    config = BuildConfig(compute_capabilities=("8.9",), components=("text_encoder_3",), opt_level=0)
    build_engines(bundle_copy, config, progress=events.append)
    kinds = [e.event for e in events]
    assert kinds[0] == "component_start" and kinds[-1] == "component_done" and events[-1].phase == "built"
    assert {"phase_start", "step", "phase_finish"} <= set(kinds)
    top = [e for e in events if e.event == "phase_start" and e.parent is None]
    assert top and top[0].num_steps > 0 and all(e.component == "text_encoder_3" for e in events)


def test_progress_callback_error_cancels_the_build(bundle_copy):
    def stop(event):
        if event.event == "step":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_engines(bundle_copy, BuildConfig(compute_capabilities=("8.9",), components=("text_encoder_3",), opt_level=0), progress=stop)
    assert not list(bundle_copy.glob("engines/*"))


def test_timing_cache_is_ignored_by_rtx(bundle_copy, tmp_path):
    cache = tmp_path / "timing.cache"
    [result] = build_engines(
        bundle_copy, BuildConfig(compute_capabilities=("8.9",), components=("text_encoder_3",), opt_level=0, timing_cache=str(cache))
    )
    assert result.status == "built" and not cache.exists()


def test_manifest_is_verified_before_building(bundle_copy):
    (bundle_copy / "onnx" / "vae_decoder.onnx").write_bytes(b"truncated")
    from latentrt.errors import BundleError

    with pytest.raises(BundleError, match="sha256"):
        build_engines(bundle_copy, BuildConfig(components=("vae_decoder",)))
    assert load_manifest(bundle_copy, verify=False).components["vae_decoder"]


def test_builder_memory_is_recorded(built, manifest):
    """The builder's totals (activations, weights) and the I/O at the profile's max are in the metadata."""
    from latentrt.engines.memory import io_bytes_at_max, pipeline_memory, EngineMemory

    _, _, results = built
    for result in results.values():
        memory = result.record.memory
        assert memory["activations"] > 0 and memory["weights"] > 0, memory
        record = result.record
        assert memory["io"] == io_bytes_at_max(record.spec.profile, record.inputs, record.outputs, vae_scale_factor=manifest.latent.vae_scale_factor)
    vae = results["vae_decoder"].record
    assert vae.memory["io"] == 4 * 16 * 96 * 96 * 4 + 4 * 3 * 768 * 768 * 4  # latents and image at batch 4, 768x768
    need = pipeline_memory({n: EngineMemory(r.record.memory["weights"], r.record.memory["activations"], r.record.memory["io"]) for n, r in results.items()})
    assert need.activations == max(r.record.memory["activations"] for r in results.values())
    assert need.total < need.weights + need.activations_if_not_shared + need.io  # one shared buffer, not one per engine
    assert vae.spec.flags["weights"] == "embedded" and vae.spec.flags["user_allocation"] is True

"""Engine choice over a folder of real TensorRT-RTX engines built for several GPUs and profiles
(plus records of engines from libraries that are not installed here): no GPU needed."""

from __future__ import annotations

import pytest

from latentrt.engines import BuildConfig, build_engines, parse_image_size
from latentrt.engines.cache import EngineSpec, list_engines, write_engine
from latentrt.engines.select import choose_engines, contains, max_batch, pick, runs_on
from latentrt.errors import BundleError

pytestmark = pytest.mark.usefixtures("rtx")


@pytest.fixture(scope="module")
def folder(engines_bundle, tmp_path_factory, manifest):
    """The VAE decoder built three times (SM 8.6 at 64x64, SM 8.9 at 128x128 batch 1:2, RTX's default
    targets for 64..256 px), and records of a NVIDIA TensorRT engine and an older RTX engine."""
    import shutil

    bundle = tmp_path_factory.mktemp("select") / "bundle"
    shutil.copytree(engines_bundle, bundle, ignore=shutil.ignore_patterns("engines"))
    base = dict(components=("vae_decoder",), opt_level=0, target="tensorrt-rtx")
    built = {
        "sm86_64": build_engines(bundle, BuildConfig(compute_capabilities=("8.6",), image_size=parse_image_size("64x64"), batch=(1, 1, 1), **base)),
        "sm89_128": build_engines(bundle, BuildConfig(compute_capabilities=("8.9",), image_size=parse_image_size("128x128"), batch=(1, 1, 2), **base)),
        "default_range": build_engines(bundle, BuildConfig(image_size=parse_image_size("64x64:128x128:256x256"), batch=(1, 1, 1), **base)),
    }
    records = {name: results[0].record for name, results in built.items()}
    template = records["sm86_64"].spec
    for name, library, version in (("trt10", "tensorrt", "10.13.0.35"), ("rtx16", "tensorrt-rtx", "1.6.0.11")):
        spec = EngineSpec(**{**template.__dict__, "library": library, "library_version": version, "compute_capabilities": ("8.9",)})
        records[name] = write_engine(bundle, spec, b"not a real plan", build_seconds=0.0, created="2030-01-01T00:00:00+00:00")
    return bundle, records


def _current(bundle, manifest):
    return [s.record for s in list_engines(bundle, manifest) if s.status == "current" and s.component == "vae_decoder"]


def test_choice_by_library_version_and_gpu(folder, manifest, rtx):
    bundle, records = folder
    installed = {"tensorrt-rtx": rtx.version, "tensorrt": None}
    usable, rejected = choose_engines(_current(bundle, manifest), installed=installed, compute_capability="8.9")
    assert [r.key for r in usable] == [records["sm89_128"].key, records["default_range"].key]  # built for this GPU first
    reasons = {r.record.key: r.reason for r in rejected}
    assert "built for compute capability 8.6, this GPU is 8.9" in reasons[records["sm86_64"].key]
    assert "tensorrt 10.13.0.35, which is not installed" in reasons[records["trt10"].key]
    assert f"built by tensorrt-rtx 1.6.0.11, but {rtx.version} is installed" in reasons[records["rtx16"].key]

    usable_86, _ = choose_engines(_current(bundle, manifest), installed=installed, compute_capability="8.6")
    assert [r.key for r in usable_86] == [records["sm86_64"].key, records["default_range"].key]


def test_hopper_gets_no_rtx_engine_and_is_told_why(folder, manifest, rtx):
    from latentrt.runtime.backends.tensorrt.engine import usable_engines

    bundle, records = folder
    assert "TensorRT-RTX's default targets" in runs_on(records["default_range"], "9.0")
    with pytest.raises(BundleError) as err:
        usable_engines(bundle, manifest, "vae_decoder", compute_capability="9.0", installed={"tensorrt-rtx": rtx.version, "tensorrt": None})
    message = str(err.value)
    assert "no TensorRT engine for component 'vae_decoder' can run here (GPU compute capability 9.0)" in message
    assert message.count("--target tensorrt") >= 3 and "is not installed" in message and "latentrt build" in message


def test_per_call_choice_by_profile(folder, manifest, rtx):
    bundle, records = folder
    usable, _ = choose_engines(_current(bundle, manifest), installed={"tensorrt-rtx": rtx.version}, compute_capability="8.9")
    assert pick(usable, {"latent_sample": (2, 16, 16, 16)}).key == records["sm89_128"].key  # 128x128 px, batch 2
    assert pick(usable, {"latent_sample": (1, 16, 32, 32)}).key == records["default_range"].key  # 256 px: only the range
    assert pick(usable, {"latent_sample": (2, 16, 32, 32)}) is None  # batch 2 at 256 px: none
    assert contains(records["sm86_64"], {"latent_sample": (1, 16, 8, 8)}) and not contains(records["sm86_64"], {"latent_sample": (1, 16, 8, 10)})
    assert max_batch(usable) == 2 and max_batch([records["sm86_64"]]) == 1


def test_no_gpu_check_without_a_gpu(folder, manifest, rtx):
    bundle, records = folder
    usable, rejected = choose_engines(_current(bundle, manifest), installed={"tensorrt-rtx": rtx.version}, compute_capability=None)
    assert {r.key for r in usable} == {records[k].key for k in ("sm86_64", "sm89_128", "default_range")}
    assert {r.record.key for r in rejected} == {records["trt10"].key, records["rtx16"].key}

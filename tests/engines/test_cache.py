"""The engine cache: keys, atomic writes, hits and misses, stale detection (pure Python, no TensorRT)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import pytest

from latentrt.engines import cache as cache_module
from latentrt.engines.cache import (
    EngineRecord,
    EngineSpec,
    engine_paths,
    find_engine,
    list_engines,
    read_records,
    spec_differences,
    write_engine,
)
from latentrt.errors import BundleError


def make_spec(**changes):
    spec = EngineSpec(
        component="vae_decoder",
        onnx_sha256="ab" * 32,
        library="tensorrt-rtx",
        library_version="1.7.1.116",
        compute_capabilities=("8.6",),
        profile={
            "axes": {"batch": [1, 1, 2]},
            "shapes": {"latent_sample": {"min": [1, 16, 4, 4], "opt": [1, 16, 8, 8], "max": [2, 16, 8, 8]}},
        },
        flags={"opt_level": 3, "workspace": None, "strongly_typed": True, "precision": "fp32", "external_data": {}},
    )
    return dataclasses.replace(spec, **changes)


def test_key_is_a_deterministic_sha256():
    assert make_spec().key == make_spec().key
    assert len(make_spec().key) == 64 and int(make_spec().key, 16) >= 0
    assert make_spec().file_stem == "vae_decoder." + make_spec().key[:16]


@pytest.mark.parametrize(
    "changes",
    [
        {"onnx_sha256": "cd" * 32},
        {"library": "tensorrt"},
        {"library_version": "1.8.0"},
        {"compute_capabilities": ("8.9",)},
        {"compute_capabilities": ("8.6", "8.9")},
        {"profile": {"axes": {"batch": [1, 1, 4]}, "shapes": {}}},
        {"flags": {"opt_level": 0, "workspace": None, "strongly_typed": True, "precision": "fp32", "external_data": {}}},
        {"flags": {"opt_level": 3, "workspace": 1 << 30, "strongly_typed": True, "precision": "fp32", "external_data": {}}},
        {"flags": {"opt_level": 3, "workspace": None, "strongly_typed": True, "precision": "fp16", "external_data": {}}},
    ],
    ids=["onnx", "library", "version", "cc", "cc-list", "profile", "opt-level", "workspace", "precision"],
)
def test_key_changes_with_every_input(changes):
    assert make_spec(**changes).key != make_spec().key


def test_spec_round_trips_json():
    spec = make_spec()
    assert EngineSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_write_then_find(tmp_path):
    spec = make_spec()
    record = write_engine(tmp_path, spec, b"engine-bytes", build_seconds=1.5, created="2026-01-01T00:00:00+00:00")
    engine, meta = engine_paths(tmp_path, spec)
    assert engine.read_bytes() == b"engine-bytes"
    assert record.engine_file == f"engines/{spec.file_stem}.engine"
    assert record.engine_bytes == 12 and record.build_seconds == 1.5
    assert EngineRecord.from_dict(json.loads(meta.read_text())) == record
    assert find_engine(tmp_path, spec) == record
    stamp = engine.with_suffix(".verified")
    assert sorted(p.name for p in engine.parent.iterdir()) == sorted([engine.name, meta.name, stamp.name])  # no temporary files left
    assert json.loads(stamp.read_text())["sha256"] == record.engine_sha256 == hashlib.sha256(b"engine-bytes").hexdigest()


def test_write_accepts_buffers(tmp_path):
    record = write_engine(tmp_path, make_spec(), memoryview(bytearray(range(10))), build_seconds=0.0)
    assert (tmp_path / record.engine_file).read_bytes() == bytes(range(10))


def test_find_misses_other_key_and_damaged_files(tmp_path):
    spec = make_spec()
    write_engine(tmp_path, spec, b"engine-bytes", build_seconds=0.1)
    assert find_engine(tmp_path, make_spec(flags={**spec.flags, "opt_level": 0})) is None
    engine, meta = engine_paths(tmp_path, spec)
    engine.write_bytes(b"trunc")
    assert find_engine(tmp_path, spec) is None
    engine.unlink()
    assert find_engine(tmp_path, spec) is None
    meta.write_text("{not json")
    assert find_engine(tmp_path, spec) is None
    assert read_records(tmp_path) == []


def test_list_engines_current_and_stale(manifest, tmp_path):
    comp = manifest.components["vae_decoder"]
    current = make_spec(onnx_sha256=comp.sha256)
    old_onnx = make_spec(onnx_sha256="00" * 32, compute_capabilities=("8.9",))
    write_engine(tmp_path, current, b"a" * 10, build_seconds=0.1, created="2026-01-01T00:00:01+00:00")
    write_engine(tmp_path, old_onnx, b"b" * 10, build_seconds=0.1, created="2026-01-01T00:00:00+00:00")
    gone = make_spec(component="unet", onnx_sha256="11" * 32)
    write_engine(tmp_path, gone, b"c", build_seconds=0.1)

    by_key = {s.record.key: s for s in list_engines(tmp_path, manifest)}
    assert by_key[current.key].status == "current" and by_key[current.key].reasons == ()
    assert by_key[old_onnx.key].status == "stale"
    assert "the ONNX file changed since the build" in by_key[old_onnx.key].reasons[0]
    assert by_key[gone.key].reasons == ("component 'unet' is no longer in the manifest",)


def test_list_engines_against_settings(manifest, tmp_path):
    comp = manifest.components["vae_decoder"]
    built = make_spec(onnx_sha256=comp.sha256)
    write_engine(tmp_path, built, b"a" * 10, build_seconds=0.1)
    wanted = dataclasses.replace(built, flags={**built.flags, "opt_level": 5})
    statuses = list_engines(tmp_path, manifest, {"vae_decoder": wanted})
    assert [(s.component, s.status) for s in statuses] == [("vae_decoder", "stale"), ("vae_decoder", "missing")]
    assert statuses[0].reasons == ("built with other settings: flags.opt_level: 3 -> 5",)
    assert statuses[1].path == engine_paths(tmp_path, wanted)[0]
    assert [s.status for s in list_engines(tmp_path, manifest, {"vae_decoder": built})] == ["current"]


def test_list_engines_reports_truncated_engine(manifest, tmp_path):
    spec = make_spec(onnx_sha256=manifest.components["vae_decoder"].sha256)
    record = write_engine(tmp_path, spec, b"a" * 10, build_seconds=0.1)
    (tmp_path / record.engine_file).write_bytes(b"a")
    [status] = list_engines(tmp_path, manifest)
    assert status.status == "stale" and "has 1 bytes, the metadata records 10" in status.reasons[0]


def test_spec_differences_names_fields():
    old, new = make_spec(), make_spec(compute_capabilities=("8.6", "8.9"), library_version="1.8")
    assert spec_differences(old, new) == ["compute_capabilities: ['8.6'] -> ['8.6', '8.9']", "library_version: 1.7.1.116 -> 1.8"]


def test_load_record_errors(tmp_path):
    from latentrt.engines.cache import load_record

    with pytest.raises(BundleError, match="missing"):
        load_record(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(BundleError, match="malformed"):
        load_record(tmp_path / "bad.json")


def _current(manifest, tmp_path, data=b"a" * 10):
    spec = make_spec(onnx_sha256=manifest.components["vae_decoder"].sha256)
    return spec, write_engine(tmp_path, spec, data, build_seconds=0.1)


def test_engine_modified_in_place_with_the_same_size_is_stale(manifest, tmp_path):
    spec, record = _current(manifest, tmp_path)
    path = tmp_path / record.engine_file
    with open(path, "r+b") as f:  # same size, one byte changed
        f.seek(3)
        f.write(b"b")
    [status] = list_engines(tmp_path, manifest)
    assert status.status == "stale" and "was modified since the build" in status.reasons[0]
    assert find_engine(tmp_path, spec) is None


def test_verification_is_cached_until_the_file_changes(manifest, tmp_path, monkeypatch):
    spec, record = _current(manifest, tmp_path)
    hashed = []
    real = cache_module.sha256_of
    monkeypatch.setattr(cache_module, "sha256_of", lambda p: hashed.append(p) or real(p))
    assert find_engine(tmp_path, spec) == record and [s.status for s in list_engines(tmp_path, manifest)] == ["current"]
    assert hashed == []  # verified when written: not read again
    path = tmp_path / record.engine_file
    stat = path.stat()
    path.write_bytes(b"a" * 10)  # rewritten with the same content: times change, hash once more
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime restored (the ctime moved)
    assert find_engine(tmp_path, spec) == record
    assert len(hashed) == 1
    assert find_engine(tmp_path, spec) == record and len(hashed) == 1


def test_unwritable_bundle_is_hashed_at_every_check(manifest, tmp_path, monkeypatch):
    spec, record = _current(manifest, tmp_path)
    (tmp_path / record.engine_file).with_suffix(".verified").unlink()
    monkeypatch.setattr(cache_module, "atomic_write", _raise_read_only)
    assert find_engine(tmp_path, spec) == record
    assert find_engine(tmp_path, spec) == record
    assert not (tmp_path / record.engine_file).with_suffix(".verified").exists()


def _raise_read_only(*args, **kwargs):
    raise PermissionError("read-only file system")


def test_metadata_whose_key_does_not_match_its_spec_is_stale(manifest, tmp_path):
    spec, record = _current(manifest, tmp_path)
    meta = engine_paths(tmp_path, spec)[1]
    raw = json.loads(meta.read_text())
    raw["spec"]["flags"]["opt_level"] = 0  # edited by hand, key left as it was
    meta.write_text(json.dumps(raw))
    [status] = list_engines(tmp_path, manifest)
    assert status.status == "stale" and "is not the sha256 of its spec" in status.reasons[0]
    assert find_engine(tmp_path, spec) is None


def test_metadata_naming_another_file_is_stale(manifest, tmp_path):
    spec, record = _current(manifest, tmp_path)
    (tmp_path.parent / "outside.engine").write_bytes(b"a" * 10)
    meta = engine_paths(tmp_path, spec)[1]
    raw = json.loads(meta.read_text())
    raw["engine_file"] = "../outside.engine"
    meta.write_text(json.dumps(raw))
    [status] = list_engines(tmp_path, manifest)
    assert status.status == "stale" and "names engine file '../outside.engine'" in status.reasons[0]
    assert status.path == engine_paths(tmp_path, spec)[0]
    assert find_engine(tmp_path, spec) is None


def test_engine_files_get_the_bundles_permissions(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "manifest.json").chmod(0o640)
    tmp_path.chmod(0o750)
    old = os.umask(0o077)  # a private umask must not make the engines private
    try:
        record = write_engine(tmp_path, make_spec(), b"engine", build_seconds=0.1)
    finally:
        os.umask(old)
    engine, meta = engine_paths(tmp_path, make_spec())
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (engine, meta, engine.with_suffix(".verified"))} == {
        engine.name: "0o640",
        meta.name: "0o640",
        engine.with_suffix(".verified").name: "0o640",
    }
    assert oct(engine.parent.stat().st_mode & 0o777) == "0o750"
    assert record.engine_file == f"engines/{engine.name}"


def test_runtime_cache_lives_next_to_its_engine_per_gpu_kind(tmp_path):
    from latentrt.engines.cache import runtime_cache_path

    record = write_engine(tmp_path, make_spec(), b"engine", build_seconds=0.1)
    path = runtime_cache_path(tmp_path, record, "8.9")
    assert path == tmp_path / "engines" / f"{make_spec().file_stem}.sm89.runtime-cache"
    assert runtime_cache_path(tmp_path, record, "12.0").name.endswith(".sm120.runtime-cache")
    path.write_bytes(b"cache")  # not metadata: the engine list ignores it
    assert [r.key for r in read_records(tmp_path)] == [record.key]

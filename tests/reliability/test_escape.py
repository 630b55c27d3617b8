"""Escape from a bundle and crafted structure: every path a bundle names must resolve inside it
(after symbolic links) before anything is opened, and a malformed manifest is refused at load with a
BundleError naming the field, not at the first call."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from latentrt.bundle.manifest import load_manifest, sha256_file
from latentrt.bundle.paths import onnx_external_data
from latentrt.cli.main import main
from latentrt.errors import BundleError
from latentrt.runtime.pipeline import Pipeline


@pytest.fixture
def bundle(tiny_sd3_bundle, tmp_path):
    return shutil.copytree(tiny_sd3_bundle, tmp_path / "bundle")


def _edit(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def _outside_copy(bundle: Path, rel: str) -> Path:
    """A byte-identical copy of the bundle's `rel` outside the bundle (so the sha256 would match)."""
    target = bundle.parent / "outside" / Path(rel).name
    target.parent.mkdir(exist_ok=True)
    shutil.copy(bundle / rel, target)
    return target


@pytest.mark.parametrize("kind", ["component", "tokenizer"])
def test_dotdot_and_absolute_paths_are_refused(bundle, kind):
    rel = "onnx/vae_decoder.onnx" if kind == "component" else "tokenizer/tokenizer.json"
    outside = _outside_copy(bundle, rel)
    for crafted in (f"../outside/{outside.name}", str(outside), f"onnx/../../outside/{outside.name}"):
        def change(raw, crafted=crafted):
            entry = raw["components"]["vae_decoder"] if kind == "component" else raw["tokenizers"]["tokenizer"]
            entry["file"] = crafted

        _edit(bundle, change)
        with pytest.raises(BundleError, match="not a plain path inside the bundle|outside the bundle"):
            load_manifest(bundle)
        with pytest.raises(BundleError, match="not a plain path inside the bundle|outside the bundle"):
            load_manifest(bundle, verify=False)
        with pytest.raises(BundleError):
            Pipeline.load(bundle)


@pytest.mark.parametrize(
    "rel,label",
    [
        ("onnx/vae_decoder.onnx", "component 'vae_decoder' file"),
        ("tokenizer_2/tokenizer.json", "tokenizer 'tokenizer_2' file"),
        ("manifest.json", "the manifest"),
    ],
)
def test_symlink_to_a_file_outside_is_refused_before_it_is_opened(bundle, rel, label):
    """The link points at a FIFO: opening it would block, so a prompt BundleError proves nothing read it."""
    fifo = bundle.parent / "outside.fifo"
    os.mkfifo(fifo)
    (bundle / rel).unlink()
    (bundle / rel).symlink_to(fifo)
    result: list = []

    def load():
        try:
            load_manifest(bundle)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            result.append(err)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(60)
    if thread.is_alive():  # unblock the reader before failing
        with open(fifo, "wb"):
            pass
        pytest.fail(f"load_manifest opened {rel}, a symbolic link to a FIFO outside the bundle")
    assert len(result) == 1 and isinstance(result[0], BundleError)
    assert label in str(result[0]) and "outside the bundle" in str(result[0])


def test_symlink_to_an_identical_file_outside_is_refused(bundle):
    rel = "onnx/transformer.onnx"
    outside = _outside_copy(bundle, rel)
    assert sha256_file(outside) == load_manifest(bundle).components["transformer"].sha256
    (bundle / rel).unlink()
    (bundle / rel).symlink_to(outside)
    with pytest.raises(BundleError, match=r"component 'transformer' file 'onnx/transformer.onnx' resolves to .*outside the bundle"):
        Pipeline.load(bundle)


def test_a_linked_folder_outside_is_refused_and_links_inside_are_fine(bundle, tmp_path):
    moved = shutil.move(str(bundle / "tokenizer"), tmp_path / "elsewhere")
    (bundle / "tokenizer").symlink_to(moved)
    with pytest.raises(BundleError, match="tokenizer 'tokenizer' file.*outside the bundle"):
        load_manifest(bundle)
    (bundle / "tokenizer").unlink()
    shutil.move(moved, bundle / "real-tokenizer")
    (bundle / "tokenizer").symlink_to("real-tokenizer")  # a link that stays inside the bundle
    assert load_manifest(bundle).family == "sd3"
    link = tmp_path / "link-to-bundle"  # the bundle itself behind a link
    link.symlink_to(bundle)
    out = Pipeline.load(link)("a red cat", num_inference_steps=1, height=64, width=64, seed=0)
    assert out.pixels.shape == (1, 64, 64, 3)


def _with_external_data(bundle: Path, location: str, *, truncate: int = 0) -> Path:
    """Re-save the bundle's VAE decoder with its weights in external data at `location` (relative to
    onnx/), then point the manifest at it (sha256 updated, as a careful attacker would)."""
    import onnx

    path = bundle / "onnx" / "vae_decoder.onnx"
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="vae_decoder.onnx.data")
    data = bundle / "onnx" / "vae_decoder.onnx.data"
    if location != "vae_decoder.onnx.data":
        model = onnx.load(str(path), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save_model(model, str(path))
        target = (bundle / "onnx" / location).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(data, target)
        data = target
    if truncate:
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size - truncate)

    def change(raw):
        raw["components"]["vae_decoder"]["sha256"] = sha256_file(path)
        raw["components"]["vae_decoder"]["external_data"] = ["onnx/vae_decoder.onnx.data"]

    if location == "vae_decoder.onnx.data":
        _edit(bundle, change)
    else:
        _edit(bundle, lambda raw: raw["components"]["vae_decoder"].__setitem__("sha256", sha256_file(path)))
    return data


def test_onnx_external_data_inside_the_bundle_loads_and_runs(bundle, tiny_sd3_bundle):
    _with_external_data(bundle, "vae_decoder.onnx.data")
    refs = onnx_external_data(bundle / "onnx" / "vae_decoder.onnx")
    assert refs and {r.location for r in refs} == {"vae_decoder.onnx.data"}
    kwargs = dict(num_inference_steps=1, height=64, width=64, seed=0)
    np.testing.assert_array_equal(Pipeline.load(bundle)("a cat", **kwargs).pixels, Pipeline.load(tiny_sd3_bundle)("a cat", **kwargs).pixels)


@pytest.mark.parametrize("location", ["../../outside.data", "/tmp/latentrt-outside.data"])
def test_onnx_external_data_outside_the_bundle_is_refused(bundle, location):
    if location.startswith("/"):
        location = str(bundle.parent / "abs-outside.data")
    _with_external_data(bundle, location)
    with pytest.raises(BundleError, match=r"component 'vae_decoder': tensor .*external data.*(outside the bundle|not a plain path inside the bundle)"):
        Pipeline.load(bundle)
    assert main(["inspect", str(bundle)]) == 2


def test_truncated_external_data_is_refused_at_load(bundle):
    _with_external_data(bundle, "vae_decoder.onnx.data", truncate=100)
    with pytest.raises(BundleError, match=r"needs bytes .* which has .*truncated"):
        load_manifest(bundle, verify=False)


def test_external_data_walk_matches_onnx(tmp_path):
    """Initializers, a tensor attribute inside an If branch and a sparse initializer: the protobuf walk
    finds what onnx's own helper finds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import _get_all_tensors, convert_model_to_external_data, uses_external_data

    def branch(name):
        value = numpy_helper.from_array(np.arange(64, dtype=np.float32), f"{name}_const")
        const = helper.make_node("Constant", [], [f"{name}_c"], value=value)
        return helper.make_graph([const], name, [], [helper.make_tensor_value_info(f"{name}_c", TensorProto.FLOAT, [64])])

    cond = helper.make_node("If", ["flag"], ["y"], then_branch=branch("then"), else_branch=branch("else"))
    add = helper.make_node("Add", ["y", "w"], ["z"])
    graph = helper.make_graph(
        [cond, add], "g",
        [helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [64])],
        initializer=[numpy_helper.from_array(np.ones(64, np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "m.onnx"
    convert_model_to_external_data(model, all_tensors_to_one_file=False, size_threshold=0, convert_attribute=True)
    onnx.save_model(model, str(path))
    loaded = onnx.load(str(path), load_external_data=False)
    expected = {
        (t.name, {e.key: e.value for e in t.external_data}["location"]) for t in _get_all_tensors(loaded) if uses_external_data(t)
    }
    assert len(expected) == 3  # the initializer and the Constant of each branch
    assert {(r.tensor, r.location) for r in onnx_external_data(path)} == expected


def _set(path: str, value):
    def change(raw):
        node = raw
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        last = keys[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda raw: raw.__setitem__("components", list(raw["components"].values())), "components"),
        (_set("components.transformer.sha256", None), "components.transformer.sha256"),
        (_set("components.transformer.sha256", "abc"), "components.transformer.sha256"),
        (_set("components.transformer.axes.latent_height.multiple_of", 0), "components.transformer.axes.latent_height.multiple_of"),
        (_set("components.transformer.axes.batch.max", -4), "components.transformer.axes.batch.max"),
        (_set("components.transformer.axes.batch.opt", 100), "components.transformer.axes.batch"),
        (_set("components.transformer.inputs.0.shape.2", "no_such_axis"), "components.transformer.inputs[0].shape[2]"),
        (_set("components.transformer.inputs", []), "components.transformer.inputs"),
        (_set("latent.vae_scale_factor", 0), "latent.vae_scale_factor"),
        (_set("latent.scaling_factor", 0), "latent.scaling_factor"),
        (_set("latent.channels", "16"), "latent.channels"),
        (_set("schema_version", 0), None),
        (_set("schema_version", -1), None),
        (_set("schema_version", True), None),
        (_set("defaults.height", "128"), "defaults.height"),
        (_set("defaults.num_inference_steps", 0), "defaults.num_inference_steps"),
        (_set("tokenizers.tokenizer.max_length", -1), "tokenizers.tokenizer.max_length"),
        (_set("tokenizers.tokenizer", "tokenizer/tokenizer.json"), "tokenizers.tokenizer"),
        (_set("scheduler", None), "scheduler"),
        (lambda raw: raw["components"].__setitem__("../escape", raw["components"].pop("vae_decoder")), "components.../escape"),
    ],
)
def test_crafted_structure_is_refused_at_load(bundle, change, field):
    _edit(bundle, change)
    with pytest.raises(BundleError) as info:
        load_manifest(bundle, verify=False)
    message = str(info.value)
    if field is None:
        assert "schema version" in message or "schema_version" in message
    else:
        assert f"field {field!r} is missing or malformed" in message
    assert "re-export" in message


@pytest.mark.parametrize(
    "change,message",
    [
        (_set("conditioning.t5_encoder", ["text_encoder_9", "tokenizer_3"]), "names component 'text_encoder_9'"),
        (_set("conditioning.clip_encoders", [["text_encoder", "tokenizer_7"]]), "names tokenizer 'tokenizer_7'"),
        (_set("defaults.height", 100), "defaults or scheduler are not usable.*height 100"),
        (_set("scheduler.class_name", "DPMSolverMultistepScheduler"), "no numpy implementation"),
        (_set("family", "sd9"), "unknown pipeline family 'sd9'"),
        (lambda raw: raw["components"].pop("vae_decoder"), "needs a 'vae_decoder' component"),
    ],
)
def test_what_the_runtime_needs_is_checked_at_load(bundle, change, message):
    _edit(bundle, change)
    with pytest.raises(BundleError, match=message):
        Pipeline.load(bundle)

"""export_pipeline: what lands in the bundle, and bad inputs that must leave nothing behind."""

from __future__ import annotations

import json
import shutil

import pytest

from latentrt.errors import ExportError, InputError
from latentrt.export.pipeline import ExportConfig, export_pipeline
from latentrt.bundle.manifest import load_manifest, sha256_file


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir())


def test_bundle_layout(tiny_sd3_bundle):
    names = {p.relative_to(tiny_sd3_bundle).as_posix() for p in tiny_sd3_bundle.rglob("*") if p.is_file()}
    assert names == {
        "manifest.json",
        *(f"onnx/{c}.onnx" for c in ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder")),
        "tokenizer/tokenizer.json",
        "tokenizer_2/tokenizer.json",
        "tokenizer_3/tokenizer.json",
    }
    m = load_manifest(tiny_sd3_bundle)
    for comp in m.components.values():
        assert comp.sha256 == sha256_file(tiny_sd3_bundle / comp.file)


def test_named_dynamic_axes_in_the_onnx_graphs(tiny_sd3_bundle):
    import onnx

    graph = onnx.load(str(tiny_sd3_bundle / "onnx" / "transformer.onnx")).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {
        "hidden_states": ["batch", 16, "latent_height", "latent_width"],
        "encoder_hidden_states": ["batch", "context_length", 96],
        "pooled_projections": ["batch", 80],
        "timestep": ["batch"],
    }
    opset = {o.domain: o.version for o in onnx.load(str(tiny_sd3_bundle / "onnx" / "vae_decoder.onnx")).opset_import}
    assert opset[""] >= 18


def test_failed_validation_leaves_nothing(tiny_sd3_dir, tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match="relative L2 error .* > tolerance"):
        export_pipeline(tiny_sd3_dir, out, ExportConfig(tolerance=1e-12))
    assert _leftovers(tmp_path) == []


def test_non_empty_output_needs_overwrite(tiny_sd3_dir, tiny_sd3_bundle, tmp_path):
    out = shutil.copytree(tiny_sd3_bundle, tmp_path / "bundle")
    (out / "manifest.json").write_text("{}")
    with pytest.raises(InputError, match="is not empty; pass --overwrite"):
        export_pipeline(tiny_sd3_dir, out)
    export_pipeline(tiny_sd3_dir, out, ExportConfig(overwrite=True, max_sequence_length=128))
    assert load_manifest(out).defaults.max_sequence_length == 128
    assert _leftovers(tmp_path) == ["bundle"]


def test_output_is_a_file(tiny_sd3_dir, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="exists and is a file"):
        export_pipeline(tiny_sd3_dir, tmp_path / "f")


def test_unknown_source(tmp_path):
    with pytest.raises(InputError, match="neither a built-in preset .*tiny-sd3.* nor a pipeline directory"):
        export_pipeline("tiny-nothing", tmp_path / "b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no model_index.json"):
        export_pipeline(tmp_path / "empty", tmp_path / "b")
    assert _leftovers(tmp_path) == ["empty"]


@pytest.fixture
def source_copy(tiny_sd3_dir, tmp_path):
    return shutil.copytree(tiny_sd3_dir, tmp_path / "source")


def test_missing_component(source_copy, tmp_path):
    shutil.rmtree(source_copy / "text_encoder_2")
    with pytest.raises(InputError, match="missing the component 'text_encoder_2'"):
        export_pipeline(source_copy, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_pickled_weights_are_refused(source_copy, tmp_path):
    weights = source_copy / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(InputError, match="'vae'.*pickle format.*safetensors only"):
        export_pipeline(source_copy, tmp_path / "b")


def test_unsupported_pipeline_class(source_copy, tmp_path):
    index = json.loads((source_copy / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (source_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="'KandinskyPipeline', which latentrt cannot export yet"):
        export_pipeline(source_copy, tmp_path / "b")


@pytest.mark.parametrize("kwargs,message", [(dict(opset=17), "opset 17 is too old"), (dict(max_batch=0), "max_batch must be >= 1")])
def test_bad_config(kwargs, message):
    with pytest.raises(InputError, match=message):
        ExportConfig(**kwargs)

"""Streamed export: the same ONNX outputs as the whole-model trace, bounded memory, clear errors for bad checkpoints."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest

from latentrt.bundle.manifest import load_manifest
from latentrt.errors import InputError
from latentrt.export.onnx_export import make_inputs
from latentrt.export.pipeline import ExportConfig, export_pipeline
from latentrt.models.fullsize import write_pipeline

PRESETS = ["tiny-sd3", "tiny-flux", "tiny-pixart", "tiny-sd15", "tiny-sdxl"]


def _outputs(bundle, name, feeds):
    comp = load_manifest(bundle).components[name]
    session = ort.InferenceSession(str(bundle / comp.file), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("preset", PRESETS)
def test_streamed_bundle_equals_whole_trace(preset, preset_source, preset_bundle, tmp_path):
    """Blocks traced once per kind and stitched: every component gives the whole trace's outputs."""
    from latentrt.models import families
    from latentrt.models.loader import load_pipeline, read_model_index

    streamed = tmp_path / "streamed"
    export_pipeline(preset_source(preset), streamed, ExportConfig(streaming="on"))
    whole = preset_bundle(preset)  # streaming "auto": tiny models are traced whole
    source = preset_source(preset)
    family = families.for_pipeline_class(read_model_index(source)["_class_name"], source)
    spec = family.describe(load_pipeline(source, family.required, family.optional))
    manifest = load_manifest(streamed)
    for comp in spec.components:
        feeds = {k: v.numpy() for k, v in make_inputs(comp.inputs, comp.validate_sizes[-1], seed=7).items()}
        for a, b in zip(_outputs(streamed, comp.name, feeds), _outputs(whole, comp.name, feeds)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
        weights = manifest.components[comp.name].weights
        for blocks in comp.blocks:  # every block's weights are mapped to the checkpoint by name
            block_params = {p for recipe in weights.values() for p, _ in recipe["parts"] if f"{blocks}.1." in p}
            assert block_params, f"{comp.name}: no weight of {blocks}.1 in the weight map"


def test_weight_map_names_the_fused_qkv(tiny_sd3_bundle):
    weights = load_manifest(tiny_sd3_bundle).components["transformer"].weights
    fused = [r for r in weights.values() if len(r["parts"]) == 3 and r["parts"][0][0].endswith("attn.to_q.weight")]
    assert fused and all(r["axis"] == 1 and [t for _, t in r["parts"]] == ["T", "T", "T"] for r in fused)
    assert [p for p, _ in fused[0]["parts"]] == [fused[0]["parts"][0][0].replace("to_q", x) for x in ("to_q", "to_k", "to_v")]


# ------------------------------------------------------------------------------------------------
# Memory: a pipeline whose T5 holds a few hundred MB


MEDIUM = {
    "class": "StableDiffusion3Pipeline",
    "models": {
        "transformer": ("diffusers", "SD3Transformer2DModel", dict(
            sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=1024, caption_projection_dim=64, pooled_projection_dim=80, pos_embed_max_size=48)),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection", dict(
            vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=32)),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", dict(
            vocab_size=1000, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=48)),
        "text_encoder_3": ("transformers", "T5EncoderModel", dict(
            vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=12, num_heads=16, feed_forward_proj="gated-gelu",
            tie_word_embeddings=False)),
        "vae": ("diffusers", "AutoencoderKL", dict(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[8, 16], layers_per_block=1,
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8,
            scaling_factor=1.5305, shift_factor=0.0609, sample_size=32)),
    },
    "scheduler": dict(shift=3.0),
    "tokenizers": {"tokenizer": ("clip", 77), "tokenizer_2": ("clip", 77), "tokenizer_3": ("t5", 32)},
}


@pytest.mark.slow
def test_streamed_export_memory_stays_under_the_weights(tmp_path):
    """The T5 (188M parameters: 752 MB in float32, 376 MB stored in bf16) is exported, written and
    validated one block at a time: the process grows by well under its weight bytes (measured: 0.47 GB;
    the whole-model path on the same pipeline grows by 3.7 GB, 5x the weights)."""
    source = write_pipeline(MEDIUM, tmp_path / "source", shard_bytes=100 * 10**6)
    assert len(list((source / "text_encoder_3").glob("model-*.safetensors"))) > 1  # sharded, with an index
    script = textwrap.dedent(
        f"""
        import json, sys
        from latentrt.export import pipeline
        pipeline.SEGMENT_BUDGET = 64 << 20
        from latentrt.export.pipeline import ExportConfig, export_pipeline
        from latentrt.models.presets import save_preset
        # A tiny export first: what it imports and caches is not the model's memory.
        export_pipeline(save_preset("tiny-sd3", {str(tmp_path / 'tiny')!r}), {str(tmp_path / 'tiny-bundle')!r}, ExportConfig(streaming="on"))
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096
        before = rss()
        export_pipeline({str(source)!r}, {str(tmp_path / 'bundle')!r}, ExportConfig(streaming="on", max_sequence_length=32))
        # VmHWM is this process's own peak: ru_maxrss would carry the parent's (vfork + exec keeps it)
        peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print(json.dumps({{"before": before, "peak": peak}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    weights = 188_000_000 * 4
    growth = measured["peak"] - measured["before"]
    manifest = load_manifest(tmp_path / "bundle")
    assert manifest.components["text_encoder_3"].external_data == ("onnx/text_encoder_3.onnx.data",)  # streamed: a data file
    assert growth < 0.75 * weights, f"peak RSS grew by {growth / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights"
    print(f"peak RSS growth {growth / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights")


# ------------------------------------------------------------------------------------------------
# Bad checkpoints: one clear error, nothing left behind


def _sharded(tmp_path, preset_source):
    """tiny-sd3 with its T5 split into two shards named by an index json."""
    import shutil

    source = shutil.copytree(preset_source("tiny-sd3"), tmp_path / "source")
    folder = source / "text_encoder_3"
    from latentrt.models.checkpoint import SafetensorsStore
    from latentrt.models.fullsize import write_safetensors_shards

    store = SafetensorsStore(folder)
    values = {n: store.get(n) for n in store}  # read before the file goes
    (folder / "model.safetensors").unlink()
    write_safetensors_shards(folder, "model", [(n, v.shape) for n, v in values.items()], lambda n, s: values[n], shard_bytes=store.nbytes // 3)
    assert (folder / "model.safetensors.index.json").is_file()
    return source


def _leftovers(path):
    return sorted(p.name for p in path.iterdir())


def test_sharded_checkpoint_exports(tmp_path, preset_source):
    source = _sharded(tmp_path, preset_source)
    manifest = export_pipeline(source, tmp_path / "bundle", ExportConfig(streaming="on"))
    assert manifest.components["text_encoder_3"].validation[0].rel_l2["last_hidden_state"] < 1e-4


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "latentrt.cli.main", *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("damage", ["missing shard", "truncated shard", "wrong shape"])
def test_bad_checkpoint_is_one_clear_error(tmp_path, preset_source, damage):
    source = _sharded(tmp_path, preset_source)
    folder = source / "text_encoder_3"
    shards = sorted(folder.glob("model-*.safetensors"))
    if damage == "missing shard":
        shards[-1].unlink()
        expected = f"names the shard {shards[-1].name}, which is missing"
    elif damage == "truncated shard":
        os.truncate(shards[0], shards[0].stat().st_size - 100)
        expected = "is truncated"
    else:
        config = json.loads((folder / "config.json").read_text())
        config["d_ff"] += 8
        (folder / "config.json").write_text(json.dumps(config))
        expected = "the config needs"
    result = _cli("export", source, "-o", tmp_path / "bundle")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert _leftovers(tmp_path) == ["source"]


def test_store_reads_bf16_shards_exactly(tmp_path):
    import ml_dtypes

    from latentrt.models.checkpoint import SafetensorsStore
    from latentrt.models.fullsize import write_safetensors_shards

    values = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4) / 7, "b.bias": np.linspace(-1, 1, 5, dtype=np.float32)}
    write_safetensors_shards(tmp_path, "model", [(n, v.shape) for n, v in values.items()], lambda n, s: values[n], shard_bytes=30)
    store = SafetensorsStore(tmp_path)
    assert sorted(store) == sorted(values) and len(list(tmp_path.glob("model-*"))) == 2
    for name, value in values.items():
        np.testing.assert_array_equal(store.get(name), value.astype(ml_dtypes.bfloat16).astype(np.float32))
    with open(tmp_path / "model-00001-of-00002.safetensors", "r+b") as f:  # a header that claims more than the file holds
        f.write(struct.pack("<Q", 10**9))
    with pytest.raises(InputError, match="truncated or not safetensors"):
        SafetensorsStore(tmp_path)


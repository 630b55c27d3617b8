"""Planted accuracy problems, for the tests, the README and `benchmarks/debug_cases.py`.

Random and small trained weights do not overflow fp16 or defeat int8 the way production checkpoints
do (FIELD.md: real T5s pass 65504 in their FFN, real text and attention activations have outlier
channels), so each case plants one in a diffusers pipeline directory, in place:

- `plant_t5_overflow`: T5's first FFN output projection scaled by 1e5: its output reaches ~1e5-1e6,
  which fp32 carries and the next RMS norm normalises, but fp16 turns into Inf.
- `plant_attention_outlier`: one channel of an SD3 block's attention values scaled by `factor` and
  the output projection's matching input row by 1 / factor. The model computes the same function (its
  fp32 images match to float rounding), but the attention output, which SmoothQuant cannot rescale
  (it is a reshape of the heads), now has an outlier channel: int8 with one scale per tensor loses
  the other channels of that layer's input.

`naive_half_bundle` / `islands_half_bundle` copy an fp32 bundle with one component converted to half
precision without fp32 islands, or with the islands export chooses from recorded ranges.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from latentrt.bundle.manifest import load_manifest, sha256_file


def plant_t5_overflow(pipeline_dir: str | os.PathLike, *, component: str = "text_encoder_3", block: int = 0, factor: float = 1e5) -> str:
    """Scale T5 block `block`'s FFN output weight by `factor`; returns the exported MatMul's node name."""
    import torch
    from transformers import T5EncoderModel

    folder = Path(pipeline_dir) / component
    model = T5EncoderModel.from_pretrained(folder)
    with torch.no_grad():
        model.encoder.block[block].layer[1].DenseReluDense.wo.weight.mul_(factor)
    model.save_pretrained(folder)
    return f"/model/encoder/block.{block}/layer.1/DenseReluDense/wo/MatMul"


def plant_attention_outlier(pipeline_dir: str | os.PathLike, *, block: int = -1, channel: int = 7, factor: float = 100.0) -> str:
    """Give SD3 transformer block `block`'s attention output an outlier channel (function unchanged);
    returns the exported node name of the layer that reads it (`attn/to_out.0`)."""
    import torch
    from diffusers import SD3Transformer2DModel

    folder = Path(pipeline_dir) / "transformer"
    model = SD3Transformer2DModel.from_pretrained(folder)
    index = block % len(model.transformer_blocks)
    attn = model.transformer_blocks[index].attn
    with torch.no_grad():
        for linear in (attn.to_v, attn.add_v_proj):  # softmax(QK^T) V is linear in each channel of V
            if linear is not None:
                linear.weight[channel].mul_(factor)
                linear.bias[channel].mul_(factor)
        for linear in (attn.to_out[0], attn.to_add_out):
            if linear is not None:
                linear.weight[:, channel].div_(factor)
    model.save_pretrained(folder)
    return f"/model/transformer_blocks.{index}/attn/to_out.0/MatMul"


def _copy_with(bundle: Path, out: Path, component: str, convert) -> Path:
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns("engines"))
    manifest = load_manifest(out)
    comp = manifest.components[component]
    path = out / comp.file
    staged = path.with_name(path.stem + ".half.onnx")
    report = convert(bundle / comp.file, staged)
    staged.replace(path)
    replaced = dataclasses.replace(comp, precision=report.precision, sha256=sha256_file(path), precision_report=report.to_dict())
    dataclasses.replace(manifest, components={**manifest.components, component: replaced}).save(out)
    return out


def naive_half_bundle(bundle: str | os.PathLike, out: str | os.PathLike, component: str, precision: str = "fp16") -> Path:
    """A copy of fp32 `bundle` whose `component` is converted to `precision` with no fp32 island."""
    from latentrt.export.precision import convert_precision

    return _copy_with(Path(bundle), Path(out), component, lambda src, dst: convert_precision(src, dst, precision, None, keep_fp32_ops=()))


def islands_half_bundle(bundle: str | os.PathLike, out: str | os.PathLike, component: str, precision: str = "fp16", *, steps: int = 2) -> Path:
    """A copy of fp32 `bundle` whose `component` is converted as `latentrt export --precision` converts
    it: fp32 islands from ranges recorded over a real generation."""
    from latentrt.debug.record import record_inputs
    from latentrt.export.precision import convert_precision, record_ranges

    feeds = record_inputs(bundle, component, steps=steps)
    return _copy_with(Path(bundle), Path(out), component, lambda src, dst: convert_precision(src, dst, precision, record_ranges(src, feeds)))

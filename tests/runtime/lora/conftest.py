"""LoRA files written from random tensors, under each layout's key names."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest


def random_pairs(model, modules, *, rank=4, seed=0, scale=0.3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module -> (A [rank, in...], B [out, rank...]) with non-zero B, shaped for `model`'s weights."""
    rng = np.random.default_rng(seed)
    params = dict(model.named_parameters())
    out = {}
    for module in modules:
        shape = tuple(params[f"{module}.weight"].shape)
        if len(shape) == 4:  # a conv: A is a conv of the same kernel, B a 1x1 conv
            down = rng.standard_normal((rank, *shape[1:]), dtype=np.float32) * scale
            up = rng.standard_normal((shape[0], rank, 1, 1), dtype=np.float32) * scale
        else:
            down = rng.standard_normal((rank, shape[1]), dtype=np.float32) * scale
            up = rng.standard_normal((shape[0], rank), dtype=np.float32) * scale
        out[module] = (down, up)
    return out


def peft_keys(prefix, pairs, *, names=("lora_A", "lora_B"), alpha=None) -> dict[str, np.ndarray]:
    """diffusers/PEFT keys: `<prefix>.<module>.lora_A.weight` (+ `.alpha`)."""
    out = {}
    for module, (down, up) in pairs.items():
        out[f"{prefix}.{module}.{names[0]}.weight"] = down
        out[f"{prefix}.{module}.{names[1]}.weight"] = up
        if alpha is not None:
            out[f"{prefix}.{module}.alpha"] = np.array(alpha, np.float32)
    return out


def peft_metadata(prefixes, *, rank, alpha, targets) -> dict[str, str]:
    """The `lora_adapter_metadata` header diffusers writes (its LoraConfig per component)."""
    flat = {}
    for prefix in prefixes:
        flat |= {f"{prefix}.r": rank, f"{prefix}.lora_alpha": alpha, f"{prefix}.target_modules": sorted(targets[prefix]), f"{prefix}.peft_type": "LORA"}
    return {"lora_adapter_metadata": json.dumps(flat)}


@pytest.fixture
def kit(tmp_path):
    """The helpers above, and `kit.write(name, tensors, metadata=None)` -> path of a safetensors file."""
    from safetensors.numpy import save_file

    def write(name, tensors, metadata=None):
        path = tmp_path / f"{name}.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
        return path

    return SimpleNamespace(random_pairs=random_pairs, peft_keys=peft_keys, peft_metadata=peft_metadata, write=write)

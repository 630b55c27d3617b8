"""Built-in tiny pipelines: the real diffusers/transformers classes with small configs and seeded random weights.

`save_preset("tiny-sd3", DIR)` writes a diffusers-format pipeline directory (model_index.json,
component folders with config.json + safetensors, tokenizer.json) that
`diffusers.StableDiffusion3Pipeline.from_pretrained(DIR)` loads. Exporting a preset goes through
that directory, so presets and user checkpoints share one code path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from latentrt.errors import InputError
from latentrt.models import flux, pixart, sd3
from latentrt.models import unet


# Each family module builds its own tiny preset.
PRESETS: dict[str, Callable[[Path, int], None]] = {"tiny-sd3": sd3.build_tiny, "bench-sd3": sd3.build_bench, "tiny-flux": flux.build_tiny, "tiny-pixart": pixart.build_tiny, "tiny-sd15": unet.build_tiny_sd15, "tiny-sdxl": unet.build_tiny_sdxl}


def save_preset(name: str, directory: str | os.PathLike, *, seed: int = 0) -> Path:
    """Build preset `name` with weights drawn from `seed` and save it as a diffusers pipeline directory."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; the built-in presets are: {', '.join(sorted(PRESETS))}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    PRESETS[name](directory, seed)
    return directory

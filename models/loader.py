"""Load a diffusers-format pipeline directory from a local path, weights from safetensors only."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentrt.errors import InputError

# Weight files that need unpickling; latentrt refuses them.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class LoadedPipeline:
    """The components of a diffusers pipeline directory, keyed by their model_index.json names."""

    path: Path
    class_name: str
    components: dict[str, Any]


def read_model_index(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    index = path / "model_index.json"
    if not path.is_dir():
        raise InputError(f"{path} is not a directory; pass a diffusers pipeline directory or a preset name")
    if not index.is_file():
        raise InputError(
            f"{path} has no model_index.json, so it is not a diffusers pipeline directory; "
            "save one with `pipeline.save_pretrained(DIR)` or pass a preset name"
        )
    try:
        return json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{index} is not valid JSON: {err}") from err


def _check_weights(folder: Path, name: str) -> None:
    files = [f for f in folder.iterdir() if f.is_file()]
    if any(f.suffix == ".safetensors" for f in files):
        return
    pickled = [f.name for f in files if f.suffix in _PICKLE_SUFFIXES]
    if pickled:
        raise InputError(
            f"component {name!r} in {folder} has weights only in pickle format ({', '.join(pickled)}); latentrt loads "
            "safetensors only. Convert it: load it in diffusers/transformers and call save_pretrained(safe_serialization=True)"
        )
    raise InputError(f"component {name!r}: {folder} has no *.safetensors weights file")


def load_pipeline(path: str | os.PathLike, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> LoadedPipeline:
    """Load the `required` (and present `optional`) components of a pipeline directory.

    Models load with `use_safetensors=True`; tokenizers and schedulers load from their folders.

    Raises:
        InputError: the directory is not a pipeline, a required component is missing, or its
            weights are not safetensors.
    """
    import diffusers
    import transformers

    path = Path(path)
    index = read_model_index(path)
    components: dict[str, Any] = {}
    for name in required + optional:
        entry = index.get(name)
        folder = path / name
        if entry is None or entry[0] is None or not folder.is_dir():
            if name in optional:
                components[name] = None
                continue
            raise InputError(
                f"{path} is missing the component {name!r} (model_index.json entry or folder {folder}); "
                f"a {index.get('_class_name', 'pipeline')} needs: {', '.join(required)}"
            )
        library, class_name = entry
        module = {"diffusers": diffusers, "transformers": transformers}.get(library)
        cls = getattr(module, class_name, None) if module else None
        if cls is None:
            raise InputError(
                f"component {name!r}: {path / 'model_index.json'} names the class {library}.{class_name}, which the installed "
                f"{library or 'library'} does not have; install a version that provides it or fix model_index.json"
            )
        if name.startswith("tokenizer"):
            components[name] = transformers.AutoTokenizer.from_pretrained(folder)
        elif name == "scheduler":
            components[name] = cls.from_pretrained(folder)
        else:
            _check_weights(folder, name)
            try:
                components[name] = cls.from_pretrained(folder, use_safetensors=True).eval()
            except (OSError, ValueError) as err:
                raise InputError(f"component {name!r}: could not load {folder}: {err}") from err
    return LoadedPipeline(path=path, class_name=index.get("_class_name", ""), components=components)

"""Load a diffusers-format pipeline directory from a local path, weights from safetensors only."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentrt.errors import InputError
from latentrt.models.checkpoint import SafetensorsStore

# Weight files that need unpickling; latentrt refuses them.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class LoadedPipeline:
    """The components of a diffusers pipeline directory, keyed by their model_index.json names.

    Models are built from their configs with their parameters on the meta device (no weights in
    memory); `stores` reads each model's weights from its safetensors when `materialize` asks.
    """

    path: Path
    class_name: str
    components: dict[str, Any]
    stores: dict[str, SafetensorsStore] = field(default_factory=dict)

    def load_weights(self) -> LoadedPipeline:
        """Load every model's weights (float32) into memory, for small pipelines; returns self."""
        for name, store in self.stores.items():
            materialize(self.components[name], store)
        return self


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
    """Build the `required` (and present `optional`) components of a pipeline directory.

    Models are built from their config.json with parameters on the meta device, and their
    safetensors are checked (every parameter present with the config's shape) without reading the
    weights; `materialize` loads them. Tokenizers and schedulers load from their folders.

    Raises:
        InputError: the directory is not a pipeline, a required component is missing, its weights
            are not safetensors, a shard is missing or truncated, or a tensor's shape disagrees with
            the config.
    """
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    path = Path(path)
    index = read_model_index(path)
    components: dict[str, Any] = {}
    stores: dict[str, SafetensorsStore] = {}
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
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise InputError(f"{path / 'model_index.json'}: the entry for {name!r} is {entry!r}; expected [library, class name]")
        library, class_name = entry
        module = {"diffusers": diffusers, "transformers": transformers}.get(library)
        cls = getattr(module, class_name, None) if module else None
        if cls is None:
            raise InputError(
                f"component {name!r}: {path / 'model_index.json'} names the class {library}.{class_name}, which the installed "
                f"{library or 'library'} does not have; install a version that provides it or fix model_index.json"
            )
        try:
            if name.startswith("tokenizer"):
                components[name] = transformers.AutoTokenizer.from_pretrained(folder)
                continue
            if name == "scheduler":
                components[name] = cls.from_pretrained(folder)
                continue
            _check_weights(folder, name)
            with init_empty_weights(include_buffers=False):
                if library == "diffusers":
                    model = cls.from_config(cls.load_config(folder))
                else:
                    model = cls._from_config(transformers.AutoConfig.from_pretrained(folder))
            if library == "transformers":
                model.tie_weights()  # as from_pretrained does (outside init_empty_weights, which re-registers)
        except InputError:
            raise
        except Exception as err:  # noqa: BLE001 - the libraries raise many types for a bad folder
            raise InputError(f"component {name!r}: could not read {folder} ({type(err).__name__}: {err}); fix or re-save that folder") from err
        stores[name] = SafetensorsStore(folder)
        _check_shapes(name, model.eval(), stores[name])
        components[name] = model
    return LoadedPipeline(path=path, class_name=index.get("_class_name", ""), components=components, stores=stores)


@dataclass(frozen=True)
class _Tensors:
    """A model's parameters and persistent buffers: each tensor's names (tied ones have several)."""

    groups: tuple[tuple[str, ...], ...]
    parameters: frozenset[str]

    @classmethod
    def of(cls, model) -> _Tensors:
        groups: dict[int, list[str]] = {}
        parameters = set()
        for name, tensor in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(tensor), []).append(name)
            parameters.add(name)
        for name, tensor in model.named_buffers(remove_duplicate=False):
            owner, _, attr = name.rpartition(".")
            if attr not in (model.get_submodule(owner) if owner else model)._non_persistent_buffers_set:  # noqa: SLF001
                groups.setdefault(id(tensor), []).append(name)
        return cls(tuple(tuple(g) for g in groups.values()), frozenset(parameters))


def _stored_name(names, store: SafetensorsStore) -> str | None:
    return next((n for n in names if n in store), None)


def _check_shapes(component: str, model, store: SafetensorsStore) -> None:
    tensors = _Tensors.of(model)
    shapes = {n: tuple(t.shape) for n, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))}
    for names in tensors.groups:
        stored = _stored_name(names, store)
        if stored is None:
            if names[0] in tensors.parameters:
                raise InputError(
                    f"component {component!r}: the checkpoint in {store.folder} has no tensor {names[0]!r}, which its config "
                    "needs; the weights do not belong to this config (or a shard is incomplete)"
                )
            continue  # a buffer the model computes itself
        if store.shape(stored) != shapes[names[0]]:
            raise InputError(
                f"component {component!r}: tensor {stored!r} has shape {list(store.shape(stored))} in "
                f"{store.tensors[stored].file.name}, the config needs {list(shapes[names[0]])}; the weights do not belong to this config"
            )


def materialize(model, store: SafetensorsStore, *, skip: Callable[[str], bool] = lambda name: False) -> None:
    """Load every parameter and persistent buffer of `model` not `skip`ped from `store`, as float32
    (integer tensors keep their dtype). Tied parameters stay tied."""
    tensors = _Tensors.of(model)
    _load(model, store, [g for g in tensors.groups if not skip(g[0])], tensors.parameters)


def _load(model, store: SafetensorsStore, groups, parameters) -> None:
    import torch

    for names in groups:
        stored = _stored_name(names, store)
        if stored is None:
            continue
        value = torch.from_numpy(store.get(stored, dtype=np.float32 if store.is_float(stored) else None))
        _assign(model, names, value, names[0] in parameters)


def _assign(model, names, value, is_param: bool) -> None:
    import torch

    tensor = torch.nn.Parameter(value, requires_grad=False) if is_param else value
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        # Into the registry directly: the registration (and ties) stay as they were.
        (module._parameters if is_param else module._buffers)[attr] = tensor  # noqa: SLF001


def release(model) -> None:
    """Put every parameter of `model` back on the meta device: its weights' memory is freed."""
    import torch

    tensors = _Tensors.of(model)
    for names in tensors.groups:
        if names[0] in tensors.parameters:
            param = model.get_parameter(names[0])
            if param.device.type != "meta":
                _assign(model, names, torch.empty(param.shape, dtype=param.dtype, device="meta"), True)


@contextmanager
def weights_per_call(model, store: SafetensorsStore, blocks: dict[str, Any]) -> Iterator[None]:
    """While active, each module in `blocks` (path inside `model` -> module) gets its parameters from
    `store` just before it runs and puts them back on the meta device right after: one block's
    weights in memory at a time."""
    import torch

    tensors = _Tensors.of(model)
    handles = []
    for path, block in blocks.items():
        mine = {f"{path}.{n}" for n, _ in block.named_parameters(remove_duplicate=False)}
        groups = [g for g in tensors.groups if g[0] in mine]

        def load(module, args, groups=groups):
            _load(model, store, groups, tensors.parameters)

        def free(module, args, output, groups=groups):
            for names in groups:
                param = model.get_parameter(names[0])
                _assign(model, names, torch.empty(param.shape, dtype=param.dtype, device="meta"), True)

        handles += [block.register_forward_pre_hook(load), block.register_forward_hook(free)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

"""`export_pipeline`: a diffusers pipeline directory (or a preset) -> a validated ONNX bundle."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from latentrt._version import __version__
from latentrt.errors import InputError
from latentrt.export.onnx_export import export_component, io_specs, validate_component
from latentrt.models import families
from latentrt.models.loader import load_pipeline, read_model_index
from latentrt.models.presets import PRESETS, save_preset
from latentrt.runtime.manifest import Component, Manifest, TokenizerSpec, sha256_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    """How to export a pipeline.

    Attributes:
        opset: ONNX opset (>= 18: LayerNormalization and GroupNormalization are native ops).
        max_batch: the most images per call the bundle is validated and profiled for.
        max_sequence_length: T5 token length prompts are padded to (SD3: 256 by default, up to 512).
        tolerance: the largest relative L2 error between ONNX Runtime and PyTorch accepted (fp32).
        overwrite: replace an existing non-empty output directory.
    """

    opset: int = 18
    max_batch: int = 4
    max_sequence_length: int = 256
    tolerance: float = 1e-4
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.opset < 18:
            raise InputError(f"opset {self.opset} is too old: latentrt exports opset >= 18 (native normalization ops)")
        if self.max_batch < 1:
            raise InputError(f"max_batch must be >= 1, got {self.max_batch}")
        if not 0 <= self.max_sequence_length <= 512:
            raise InputError(f"max_sequence_length must be in [0, 512], got {self.max_sequence_length}")


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise InputError(f"output {output} exists and is a file; choose a directory path for the bundle")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise InputError(f"output {output} is not empty; pass --overwrite to replace it or choose another path")
    parent = output.parent if output.parent != Path("") else Path(".")
    if not parent.is_dir():
        raise InputError(f"cannot write {output}: its parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write {output}: no write permission on {parent}")


def export_pipeline(
    source: str | os.PathLike,
    output: str | os.PathLike,
    config: ExportConfig = ExportConfig(),
    *,
    progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Export every component of a text-to-image pipeline to ONNX, validate each, and write a bundle.

    Args:
        source: a diffusers pipeline directory, or the name of a built-in preset (e.g. "tiny-sd3").
        output: the bundle directory to create. It is written to a temporary sibling and renamed,
            so a failed or interrupted export leaves nothing behind.
        progress: called with the name of each step as it starts (the CLI draws it).

    Example:
        >>> export_pipeline("tiny-sd3", "bundles/tiny-sd3")  # doctest: +SKIP
    """
    output = Path(output)
    _check_output(output, config.overwrite)
    source_str = str(source)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the bundle should get the usual permissions
    try:
        if source_str in PRESETS and not Path(source_str).exists():
            pipeline_dir = save_preset(source_str, tmp / "preset-source")
        elif Path(source_str).is_dir():
            pipeline_dir = Path(source_str)
        else:
            raise InputError(
                f"{source_str!r} is neither a built-in preset ({', '.join(sorted(PRESETS))}) nor a pipeline directory"
            )
        manifest = _export_into(pipeline_dir, tmp, config, source_str, progress)
        if pipeline_dir.parent == tmp:
            shutil.rmtree(pipeline_dir)
        _replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing `target` is removed only once `new` is in place."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)


def _export_into(pipeline_dir: Path, bundle: Path, config: ExportConfig, source: str, progress) -> Manifest:
    class_name = read_model_index(pipeline_dir).get("_class_name", "")
    family = families.for_pipeline_class(class_name, pipeline_dir)
    loaded = load_pipeline(pipeline_dir, family.required, family.optional)
    spec = family.describe(loaded, max_batch=config.max_batch, max_sequence_length=config.max_sequence_length)

    (bundle / "onnx").mkdir()
    components = {}
    for comp in spec.components:
        if progress:
            progress(comp.name)
        rel = f"onnx/{comp.name}.onnx"
        path = bundle / rel
        logger.info("exporting %s", comp.name)
        external = export_component(comp, path, opset=config.opset)
        validation = validate_component(comp, path, tolerance=config.tolerance)
        inputs, outputs = io_specs(path)
        components[comp.name] = Component(
            file=rel,
            sha256=sha256_file(path),
            inputs=inputs,
            outputs=outputs,
            axes=comp.axes,
            precision="fp32",
            opset=config.opset,
            external_data=tuple(f"onnx/{name}" for name in external),
            validation=tuple(validation),
        )

    tokenizers = {}
    for folder, (tok, max_length) in spec.tokenizers.items():
        (bundle / folder).mkdir()
        tok.backend_tokenizer.save(str(bundle / folder / "tokenizer.json"))
        if tok.pad_token_id is None:
            raise InputError(f"tokenizer {folder!r} in {pipeline_dir} has no pad token; set pad_token in its tokenizer_config.json")
        tokenizers[folder] = TokenizerSpec(file=f"{folder}/tokenizer.json", max_length=max_length, pad_id=tok.pad_token_id)

    manifest = Manifest(
        family=spec.family,
        components=components,
        tokenizers=tokenizers,
        latent=spec.latent,
        scheduler=_jsonable(spec.scheduler),
        defaults=spec.defaults,
        conditioning=spec.conditioning,
        source=source,
        latentrt_version=__version__,
    )
    manifest.save(bundle)
    return manifest


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj

"""What an export needs to know about one component: its adapter module, inputs and dynamic axes.

Each family module (models/sd3.py, ...) turns a loaded pipeline into a `FamilyExport`: a list of
`ComponentExport` plus the manifest fields that describe the pipeline around them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from latentrt.bundle.manifest import AxisRange, Defaults, LatentSpec


@dataclass(frozen=True)
class TensorTemplate:
    """One model input or output: its shape template (ints and axis names) and how to draw test values.

    Integer inputs are drawn uniformly from `[low, high)`; float inputs from a standard normal,
    or uniformly from `[low, high)` when both are given (a timestep, for example).
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"
    low: float | None = None
    high: float | None = None


@dataclass
class ComponentExport:
    """An export adapter (a torch.nn.Module with fixed input/output names) and its axes.

    `trace_sizes` are the axis sizes the export traces with (small: tracing cost grows with them);
    `validate_sizes` are the sizes ONNX Runtime is compared with PyTorch on (batch 1 and 2, a
    non-square latent different from the traced one). `module.model` is the checkpoint's model.
    """

    name: str
    module: Any
    inputs: tuple[TensorTemplate, ...]
    outputs: tuple[TensorTemplate, ...]
    axes: dict[str, AxisRange]
    trace_sizes: dict[str, int]
    validate_sizes: tuple[dict[str, int], ...]
    # "torchscript" (fast, dynamic_axes) or "dynamo" (torch.export, for graphs whose shape
    # arithmetic the TorchScript tracer folds into constants).
    exporter: Literal["torchscript", "dynamo"] = "torchscript"
    # ModuleLists of repeated blocks inside `source` (e.g. "transformer_blocks"): a streamed export
    # traces each kind of block once and reads its weights per block (export/blocks.py).
    blocks: tuple[str, ...] = ()

    @property
    def source(self) -> Any:
        """The checkpoint's model inside the adapter (every adapter keeps it as `.model`)."""
        return self.module.model

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def __post_init__(self) -> None:
        # A fresh wrapper module is in training mode, and torch.onnx.export restores that mode
        # recursively afterwards, which would switch dropout on in the wrapped model.
        self.module.eval()


@dataclass
class FamilyExport:
    """Everything `export_pipeline` needs from a family module."""

    family: str
    components: list[ComponentExport]
    tokenizers: dict[str, Any]  # bundle folder name -> (transformers tokenizer, max_length)
    latent: LatentSpec
    scheduler: dict[str, Any]
    defaults: Defaults
    conditioning: dict[str, Any] = field(default_factory=dict)


def scheduler_entry(scheduler, **overrides: Any) -> dict[str, Any]:
    """The manifest's scheduler entry: diffusers class name and config (with `overrides` applied)."""
    return {"class_name": type(scheduler).__name__, "config": {**dict(scheduler.config), **overrides}}

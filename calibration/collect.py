"""Calibration statistics from the bundle's own pipeline, over the whole denoising trajectory.

`collect_statistics` runs `Pipeline` on ONNX Runtime with the denoiser replaced by a
`CalibratingEngine`: the same engine contract, backed by a session of the denoiser whose graph also
outputs the tensors to observe. Every step's call (uncond and cond rows alike) updates running
statistics and nothing else is kept:

- per tensor: max |x| and a `Histogram` of |x| (2048 bins, re-binned as the max grows);
- per tensor and input channel (last axis): max |x|, for SmoothQuant.

The VAE decoder is replaced by a stub: calibration needs the denoiser's inputs, not images.
Same bundle, prompts, steps and seed: same statistics, bit for bit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from latentrt.calibration.histogram import DEFAULT_BINS, Histogram
from latentrt.bundle.manifest import Manifest, TensorSpec

logger = logging.getLogger(__name__)


@dataclass
class TensorStats:
    """Running statistics of one tensor. `channel_absmax` is float32 [C] (last axis) or None."""

    absmax: float = 0.0
    histogram: Histogram | None = None
    channel_absmax: np.ndarray | None = None
    calls: int = 0


@dataclass
class StatsCollector:
    """Updates `TensorStats` for the observed tensors.

    Args:
        tensors: names to observe.
        histograms: keep a histogram of each (percentile and entropy need one; minmax does not).
        channels: names whose per-channel max is also kept.
    """

    tensors: Sequence[str]
    histograms: bool = True
    channels: Iterable[str] = ()
    bins: int = DEFAULT_BINS
    stats: dict[str, TensorStats] = field(init=False)

    def __post_init__(self) -> None:
        channels = set(self.channels)
        self.stats = {
            name: TensorStats(histogram=Histogram(self.bins) if self.histograms else None, channel_absmax=None if name not in channels else np.zeros(0, np.float32))
            for name in dict.fromkeys([*self.tensors, *channels])
        }

    def update(self, name: str, value: np.ndarray) -> None:
        stats = self.stats[name]
        a = np.abs(value)
        stats.absmax = max(stats.absmax, float(a.max()) if a.size else 0.0)
        if not np.isfinite(stats.absmax):
            raise ValueError(f"tensor {name!r} held inf or NaN during calibration; the fp32 model overflows on these inputs")
        if stats.histogram is not None:
            stats.histogram.update(a)
        if stats.channel_absmax is not None:
            per_channel = a.reshape(-1, a.shape[-1]).max(axis=0)
            stats.channel_absmax = per_channel if stats.calls == 0 else np.maximum(stats.channel_absmax, per_channel)
        stats.calls += 1


def tap_model(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs `tensors` (float32 intermediates).

    Polygraphy's `ModifyOutputs` marks outputs too, but not the same way: it replaces the output list
    (the component's own outputs lose their declared dtype and shape), reads each name as an fnmatch
    pattern and declares the new outputs untyped. This appends literally named float32 outputs and
    keeps calibration free of Polygraphy (`latentrt debug`, which re-marks every output, uses it).
    """
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    existing = {o.name for o in tapped.graph.output}
    for name in tensors:
        if name not in existing:
            tapped.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return tapped


class CalibratingEngine:
    """The denoiser's engine contract, observing intermediate tensors on every call.

    Args:
        path: an ONNX file whose graph outputs include the observed tensors (`tap_model`).
        inputs, outputs: the component's manifest specs; the call returns only `outputs`.
        collector: receives every observed tensor of every call.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        collector: StatsCollector,
        *,
        threads: int = 0,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self._session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.collector = collector
        self._names = [o.name for o in self.outputs] + [n for n in collector.stats if n not in {o.name for o in self.outputs}]
        self.calls = 0

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = dict(zip(self._names, self._session.run(self._names, {s.name: feeds[s.name] for s in self.inputs})))
        for name in self.collector.stats:
            self.collector.update(name, results[name])
        self.calls += 1
        return {o.name: results[o.name] for o in self.outputs}


class _NullDecoder:
    """Stands in for the VAE decoder: zeros of the image's shape."""

    def __init__(self, scale: int) -> None:
        self.scale = scale

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, _, h, w = feeds["latent_sample"].shape
        return {"sample": np.zeros((n, 3, h * self.scale, w * self.scale), np.float32)}


@dataclass(frozen=True)
class TrajectorySettings:
    """How the pipeline is run for calibration (None: the manifest's defaults)."""

    steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0
    batch_size: int = 0  # prompts per pipeline call; 0: as many as the denoiser's batch range allows, up to 4


def collect_statistics(
    bundle: str | os.PathLike,
    manifest: Manifest,
    tapped_path: str | os.PathLike,
    collector: StatsCollector,
    prompts: Sequence[str],
    settings: TrajectorySettings = TrajectorySettings(),
    *,
    progress: Callable[[int, int], None] | None = None,
) -> StatsCollector:
    """Generate for every prompt with the bundle's pipeline, observing the denoiser at every step.

    Args:
        tapped_path: the denoiser's ONNX with the observed tensors as extra outputs (`tap_model`).
        progress: called as `progress(prompts_done, len(prompts))` after each pipeline call.

    Returns:
        `collector`, updated.
    """
    from latentrt.runtime.families import FAMILIES
    from latentrt.runtime.backends.onnxruntime.engine import OnnxRuntimeEngine
    from latentrt.runtime.pipeline import Pipeline

    bundle = Path(bundle)
    denoiser = FAMILIES[manifest.family].denoiser
    engines: dict = {}
    for name, comp in manifest.components.items():
        if name == denoiser:
            engines[name] = CalibratingEngine(tapped_path, comp.inputs, comp.outputs, collector)
        elif name == "vae_decoder":
            engines[name] = _NullDecoder(manifest.latent.vae_scale_factor)
        else:
            engines[name] = OnnxRuntimeEngine(bundle / comp.file, comp.inputs, comp.outputs)
    pipe = Pipeline(bundle, manifest, engines)
    guidance = manifest.defaults.guidance_scale if settings.guidance_scale is None else settings.guidance_scale
    batch = settings.batch_size
    if batch <= 0:
        max_batch = manifest.components[denoiser].axes["batch"].max
        batch = max(1, min(4, max_batch // (2 if pipe.family.uses_cfg(guidance) else 1)))
    done = 0
    for k, start in enumerate(range(0, len(prompts), batch)):
        chunk = list(prompts[start : start + batch])
        pipe(
            chunk,
            num_inference_steps=settings.steps,
            guidance_scale=guidance,
            height=settings.height,
            width=settings.width,
            seed=settings.seed + k,
        )
        done += len(chunk)
        if progress:
            progress(done, len(prompts))
    return collector

"""Running both graphs with every compared tensor marked as an output, through Polygraphy.

The runners are Polygraphy's (`OnnxrtRunner` over `SessionFromOnnx`, `TrtRunner` over
`EngineFromNetwork`), built lazily as its loaders are; the outputs are marked with its
`ModifyOutputs` / `ModifyNetworkOutputs`. `Comparator.run` streams one call at a time through both
runners; each marked tensor is measured as it streams past (max |difference|, the sums of squares
that make the relative L2 over all calls, NaN / Inf counts, value ranges), and
`Comparator.compare_accuracy` checks the component's own outputs (`SimpleCompareFunc`, as
`polygraphy run` does). Polygraphy's comparison functions are not run on every marked tensor: they
format their statistics (quantiles, histograms) whether or not anything is logged, ~40 ms a tensor on
the demo transformer, ten minutes for one 16-step generation. Memory: one call's tensors of both
runners at a time.

Polygraphy logs to stdout through a global logger; every call here runs with it silenced (its
critical errors still raise, and are re-raised as `latentrt.errors` classes).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentrt.errors import BuildError, InputError, LatentRTError

logger = logging.getLogger(__name__)


@dataclass
class TensorStats:
    """One tensor over every compared call.

    Where both hold the same value (the same infinity, or both NaN) the difference is 0. `max_abs`
    is the largest |candidate - reference| (NaN once a difference is NaN), `diff_sq` and `ref_sq`
    the sums of squared differences and squared finite reference values (relative L2 =
    sqrt(diff_sq / ref_sq) over all calls), `nan` / `inf` count the candidate's NaN / Inf where the
    reference is finite, `low` / `high` are the candidate's finite value range and `ref_absmax` the
    reference's largest finite |value|.
    """

    max_abs: float = 0.0
    diff_sq: float = 0.0
    ref_sq: float = 0.0
    nan: int = 0
    inf: int = 0
    low: float = math.inf
    high: float = -math.inf
    ref_absmax: float = 0.0
    calls: int = 0

    @property
    def rel_l2(self) -> float:
        if self.ref_sq > 0:
            return math.sqrt(self.diff_sq / self.ref_sq)
        return 0.0 if self.diff_sq == 0 else math.inf

    def observe(self, candidate: np.ndarray, reference: np.ndarray) -> None:
        c = np.asarray(candidate)
        r = np.asarray(reference, dtype=np.float64)
        if c.shape != r.shape:
            raise InputError(f"a tensor has shape {c.shape} in the candidate and {r.shape} in the reference; the graphs differ there")
        # Values the reference holds too (T5's log(0) = -inf relative position, say) are no error.
        same = (c == r) | (np.isnan(c) & np.isnan(r))
        expected = ~np.isfinite(r)
        self.nan += int((np.isnan(c) & ~expected).sum())
        self.inf += int((np.isinf(c) & ~expected).sum())
        finite = c[np.isfinite(c)]
        if finite.size:
            self.low = min(self.low, float(finite.min()))
            self.high = max(self.high, float(finite.max()))
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.where(same, 0.0, np.abs(c.astype(np.float64) - r))
        if diff.size:
            peak = float(diff.max())  # NaN as soon as one difference is NaN
            self.max_abs = peak if math.isnan(peak) or math.isnan(self.max_abs) else max(self.max_abs, peak)
            if (~expected).any():
                self.ref_absmax = max(self.ref_absmax, float(np.abs(r[~expected]).max()))
        self.diff_sq += float(np.square(diff).sum())
        self.ref_sq += float(np.square(np.where(expected, 0.0, r)).sum())
        self.calls += 1


@contextlib.contextmanager
def quiet_polygraphy() -> Iterator[None]:
    """Polygraphy with its logger silenced; its exceptions become `LatentRTError`s."""
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        try:
            yield
        except PolygraphyException as err:
            raise LatentRTError(f"Polygraphy failed: {err}") from err


def onnxruntime_runner(path: Path, outputs: Sequence[str], scratch: Path, name: str):
    """Polygraphy's ONNX Runtime runner (CPU, graph optimizations off, so Q/DQ pairs and half
    roundings run as written) for the model at `path` with `outputs` marked as its outputs."""
    from polygraphy.backend.onnx import ModifyOutputs, OnnxFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    import onnxruntime as ort

    from latentrt.debug.graphs import save

    marked = save(ModifyOutputs(OnnxFromPath(os.fspath(path)), outputs=list(outputs))(), scratch / f"{name}.marked.onnx")
    session = SessionFromOnnx(os.fspath(marked), providers=["cpu"], graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return OnnxrtRunner(session, name=name)


def tensorrt_runner(path: Path, outputs: Sequence[str], feeds: Sequence[dict[str, np.ndarray]], name: str):
    """Polygraphy's TensorRT runner over a strongly typed network parsed from `path` (precision comes
    from the ONNX dtypes and Q/DQ nodes, as `latentrt build` builds it), `outputs` marked, one
    optimization profile spanning the recorded shapes. Marking every tensor stops TensorRT from fusing
    across them: per-layer errors come from an engine that fuses less than the bundle's."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, ModifyNetworkOutputs, NetworkFromOnnxPath, Profile, TrtRunner

    profile = Profile()
    for input_name in feeds[0]:
        shapes = np.array([feed[input_name].shape for feed in feeds])
        profile.add(input_name, min=tuple(shapes.min(0)), opt=tuple(shapes.max(0)), max=tuple(shapes.max(0)))
    parse = NetworkFromOnnxPath(os.fspath(path), strongly_typed=True)

    def network():
        # The parser folds some ONNX tensors away (constants, shape arithmetic): mark those it kept.
        from polygraphy.backend.trt import util as trt_util

        builder, net, parser = parse()
        present = trt_util.get_all_tensors(net)
        return ModifyNetworkOutputs((builder, net, parser), outputs=[t for t in outputs if t in present])()

    return TrtRunner(EngineFromNetwork(network, config=CreateConfig(profiles=[profile])), name=name)


def compare(
    candidate,
    reference,
    feeds: Sequence[dict[str, np.ndarray]],
    tensors: Sequence[str],
    *,
    outputs: Sequence[str],
    tolerance: float,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, TensorStats], bool]:
    """Run both Polygraphy runners on every feed and measure each of `tensors` (candidate vs reference).

    Returns:
        the statistics of every tensor both runners returned, and Polygraphy's verdict on the
        component's `outputs` (`SimpleCompareFunc`, element-wise, atol = rtol = `tolerance`).
    """
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    wanted = set(tensors)
    stats = {name: TensorStats() for name in tensors}

    def observed(stream) -> Iterator:
        for i, results in enumerate(stream):
            (_, [cand]), (_, [ref]) = list(results.items())
            for name in wanted & set(cand.keys()) & set(ref.keys()):
                if np.asarray(ref[name]).dtype.kind == "f":
                    stats[name].observe(cand[name], ref[name])
            yield results
            if progress:
                progress(i + 1, len(feeds))

    finals = set(outputs)

    def final_outputs(name: str, index: int, other) -> list[str] | None:
        return [name] if name in finals and name in other else None

    check = SimpleCompareFunc(atol=tolerance, rtol=tolerance, find_output_func=final_outputs)
    try:
        with quiet_polygraphy():
            stream = Comparator.run([candidate, reference], data_loader=list(feeds), streaming=True)
            accuracy = Comparator.compare_accuracy(observed(stream), compare_func=check)
    except LatentRTError:
        raise
    except RuntimeError as err:  # ONNX Runtime / TensorRT errors surface as RuntimeErrors
        kind = BuildError if "trt" in type(candidate).__name__.lower() else InputError
        raise kind(f"running the graphs failed: {err}") from err
    return {name: s for name, s in stats.items() if s.calls}, bool(accuracy)

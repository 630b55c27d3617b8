"""Which of a bundle's engines can run here, and which one serves a given call.

A bundle may hold several engines per component: built for other GPUs, by another library or
version, for other resolutions or batch sizes. At load, each current engine (built from the
manifest's ONNX, file intact) is checked against this machine:

1. its library (NVIDIA TensorRT or TensorRT-RTX) must be importable here;
2. its library version must be the installed one: TensorRT and TensorRT-RTX plans deserialize
   only in the exact release that built them;
3. the GPU's compute capability must be among the engine's targets. An NVIDIA TensorRT engine
   records the GPU it was built on; a TensorRT-RTX engine built without explicit targets runs on
   RTX's portable set (8.0, 8.6, 8.9, 12.0), never on Hopper (9.0) or Turing (7.5).

The engines that pass are ordered by preference (built for exactly this GPU first, then the
newest); the others are reported with the reason, so that "no usable engine" says what to rebuild.
Per call, `pick` takes the first usable engine whose optimization profile contains the call's
input shapes: engines for several resolutions coexist, each serving the calls it fits.

Everything here reads metadata only: no GPU and no TensorRT import.

Example:
    >>> usable, rejected = choose_engines(records, installed={"tensorrt-rtx": "1.7.1.116"}, compute_capability="8.9")  # doctest: +SKIP
    >>> pick(usable, {"latent_sample": (1, 16, 128, 128)})  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from latentrt.engines.cache import EngineRecord
from latentrt.engines.library import RTX_DEFAULT_COMPUTE_CAPABILITIES


@dataclass(frozen=True)
class Rejected:
    """An engine that cannot run here, and why (one sentence)."""

    record: EngineRecord
    reason: str


def runs_on(record: EngineRecord, compute_capability: str | None) -> str | None:
    """Why `record` cannot run on a GPU of `compute_capability`, or None when it can (or when the GPU is unknown)."""
    if compute_capability is None:
        return None
    targets = record.spec.compute_capabilities
    if not targets:
        if record.spec.library == "tensorrt-rtx":
            targets = RTX_DEFAULT_COMPUTE_CAPABILITIES
        else:
            return None  # NVIDIA TensorRT engines always record their GPU; an old record without one is tried
    if compute_capability in targets:
        return None
    default = " (TensorRT-RTX's default targets)" if not record.spec.compute_capabilities else ""
    return (
        f"built for compute capability {', '.join(targets)}{default}, this GPU is {compute_capability}: "
        + ("rebuild with `latentrt build --target tensorrt` (TensorRT-RTX has no Hopper target)" if compute_capability.startswith("9.")
           else f"rebuild with `latentrt build --compute-capability {compute_capability}`")
    )


def library_problem(record: EngineRecord, installed: Mapping[str, str | None]) -> str | None:
    """Why `record`'s library cannot load it here (not installed, another version), or None."""
    library, version = record.spec.library, record.spec.library_version
    have = installed.get(library)
    if not have:
        package = "tensorrt" if library == "tensorrt" else "tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings"
        return f"built by {library} {version}, which is not installed (pip install {package}=={version}) - or rebuild with the library you have"
    if have != version:
        return f"built by {library} {version}, but {have} is installed: engines load only in the release that built them; rebuild with `latentrt build`"
    return None


def choose_engines(
    records: Iterable[EngineRecord],
    *,
    installed: Mapping[str, str | None],
    compute_capability: str | None,
) -> tuple[list[EngineRecord], list[Rejected]]:
    """The usable engines among `records` (best first) and the rejected ones with their reasons.

    Args:
        records: one component's current engines (`list_engines(...)` with status "current").
        installed: per library ("tensorrt", "tensorrt-rtx"), the installed version or None.
        compute_capability: the GPU's ("8.9"); None skips the GPU check.
    """
    usable, rejected = [], []
    for record in records:
        reason = library_problem(record, installed) or runs_on(record, compute_capability)
        if reason:
            rejected.append(Rejected(record, reason))
        else:
            usable.append(record)
    exact = lambda r: compute_capability is not None and compute_capability in r.spec.compute_capabilities  # noqa: E731
    usable.sort(key=lambda r: (exact(r), r.created), reverse=True)
    return usable, rejected


def profile_shapes(record: EngineRecord) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """The engine's (min, opt, max) shape per input, from its metadata."""
    shapes = record.spec.profile.get("shapes", {})
    return {name: tuple(tuple(int(d) for d in s[level]) for level in ("min", "opt", "max")) for name, s in shapes.items()}  # type: ignore[misc]


def contains(record: EngineRecord, shapes: Mapping[str, Sequence[int]]) -> bool:
    """Whether every input shape in `shapes` lies inside the engine's profile (inputs not given are not checked)."""
    for name, (lo, _, hi) in profile_shapes(record).items():
        if name not in shapes:
            continue
        shape = tuple(int(d) for d in shapes[name])
        if len(shape) != len(lo) or any(not a <= d <= b for d, a, b in zip(shape, lo, hi)):
            return False
    return True


def pick(records: Sequence[EngineRecord], shapes: Mapping[str, Sequence[int]]) -> EngineRecord | None:
    """The first of `records` (in preference order) whose profile contains `shapes`, or None."""
    return next((r for r in records if contains(r, shapes)), None)


def max_batch(records: Iterable[EngineRecord]) -> int | None:
    """The largest batch any of `records` takes (the max of its "batch" axis), or None without a batch axis."""
    sizes = [int(r.spec.profile["axes"]["batch"][2]) for r in records if "batch" in r.spec.profile.get("axes", {})]
    return max(sizes) if sizes else None


def describe_profile(record: EngineRecord) -> str:
    """ "hidden_states 1x16x4x4..4x16x96x96, timestep 1..4" for error messages."""
    parts = []
    for name, (lo, _, hi) in profile_shapes(record).items():
        parts.append(f"{name} {'x'.join(map(str, lo))}..{'x'.join(map(str, hi))}")
    return ", ".join(parts)

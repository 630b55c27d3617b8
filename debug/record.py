"""Real inputs for one component: what the bundle's own pipeline feeds it during a generation."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from latentrt.bundle.manifest import Manifest, load_manifest
from latentrt.errors import InputError

#: The prompt recorded when none is given (the first of `make demo`'s prompts; short enough for the demo's 16 tokens).
DEFAULT_PROMPT = "a large red circle on the left"


class _Recording:
    """Wraps an engine: the same call, plus a copy of the feeds of the calls asked for."""

    def __init__(self, engine, calls: Sequence[int] | None) -> None:
        self.engine = engine
        self.inputs = engine.inputs
        self.outputs = engine.outputs
        self.calls = None if calls is None else set(calls)
        self.count = 0
        self.feeds: list[dict[str, np.ndarray]] = []

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.calls is None or self.count in self.calls:
            self.feeds.append({name: np.array(value, copy=True) for name, value in feeds.items()})
        self.count += 1
        return self.engine(feeds)

    def close(self) -> None:
        self.engine.close()


def record_inputs(
    bundle: str | os.PathLike,
    component: str,
    *,
    prompt: str = DEFAULT_PROMPT,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    calls: Sequence[int] | None = None,
) -> list[dict[str, np.ndarray]]:
    """The feeds `component` receives while the bundle generates `prompt` on ONNX Runtime (CPU).

    Args:
        steps, guidance_scale: the generation's (None: the manifest's defaults).
        calls: 0-based indices of the component's calls to keep (the denoiser is called once per
            step); None keeps every call.

    Returns:
        one `{input name: array}` per kept call, in call order.

    bf16 components run as export's simulation models (ONNX Runtime's CPU provider has no bf16
    kernels); every other component runs as `latentrt generate` runs it.

    Example:
        >>> feeds = record_inputs("out/demo-bundle", "transformer", steps=4)  # doctest: +SKIP
        >>> len(feeds), feeds[0]["hidden_states"].shape  # doctest: +SKIP
        (4, (2, 4, 8, 8))
    """
    import tempfile

    from latentrt.runtime.backends.onnxruntime.engine import OnnxRuntimeEngine
    from latentrt.runtime.pipeline import Pipeline

    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    check_component(manifest, component, bundle)
    with tempfile.TemporaryDirectory(prefix="latentrt-debug-") as scratch:
        engines = {}
        for name, comp in manifest.components.items():
            path = bundle / comp.file
            if comp.precision == "bf16":
                from latentrt.export.precision import simulation_model

                path = simulation_model(path, Path(scratch) / f"{name}.onnx")
            engines[name] = OnnxRuntimeEngine(path, comp.inputs, comp.outputs)
        recorder = _Recording(engines[component], calls)
        engines[component] = recorder
        try:
            Pipeline(bundle, manifest, engines)(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed)
        finally:
            for engine in engines.values():
                engine.close()
    if not recorder.feeds:
        raise InputError(
            f"{component!r} was called {recorder.count} times while generating, none of them among the calls asked "
            f"({sorted(calls or ())}); ask for calls between 0 and {recorder.count - 1}"
        )
    return recorder.feeds


def check_component(manifest: Manifest, component: str, bundle: Path) -> None:
    if component not in manifest.components:
        raise InputError(f"{bundle} has no component {component!r}; it has: {', '.join(manifest.components)}")

"""The family protocol: what differs between pipeline families at run time.

The sampling loop in runtime/pipeline.py is the same for every family. It asks the family named in
the manifest (`runtime/families/__init__.py` maps names to classes) for:

- `conditioning(prompts, negatives, cfg=...)`: the denoiser's text conditioning; with classifier-free
  guidance the negatives (None when the user gave none) are batched first;
- `latent_shape(n, h, w)`: the initial latents' shape, in the denoiser's layout;
- `schedule(steps, h, w)`: the numpy scheduler's `Schedule` (runtime/schedulers/__init__.py);
- `denoiser_feeds(x, t, cond, guidance_scale)` and `model_output(outputs)`: one denoiser call;
- `decoder_input(latents, h, w)`: what the VAE decoder reads;
- `uses_cfg(guidance_scale)`: whether uncond and cond are batched for classifier-free guidance.

`Family` implements the common case (NCHW latents, `sample` output, CFG when guidance > 1).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import numpy as np

from latentrt.errors import BundleError
from latentrt.bundle.manifest import AxisRange, Manifest
from latentrt.runtime.schedulers import Schedule, make_schedule
from latentrt.runtime.tokenizer import PromptTokenizer

Engine = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class Family:
    """Defaults shared by the families; subclasses override what differs."""

    denoiser = "transformer"

    #: how many negative-prompt encodings `encode` keeps (per component and length)
    negative_cache_size = 8

    def __init__(self, manifest: Manifest, engines: Mapping[str, Engine], tokenizers: Mapping[str, PromptTokenizer]) -> None:
        self.manifest = manifest
        self.engines = engines
        self.tokenizers = tokenizers
        self._negatives: dict[tuple, dict[str, np.ndarray]] = {}
        self._negatives_lock = threading.Lock()  # `encode` may run in several threads at once
        try:
            self.setup(manifest.conditioning)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise BundleError(
                f"the manifest's {manifest.family} conditioning block is incomplete ({err!r}); re-export the bundle"
            ) from err

    def setup(self, conditioning: dict) -> None:
        """Read the family's parameters from the manifest's `conditioning` block."""

    def require(self, component: str, tokenizer: str | None = None) -> tuple[str, str | None]:
        """Check that the bundle has `component` (and `tokenizer`), as the conditioning block says."""
        if component not in self.manifest.components:
            raise BundleError(
                f"the manifest's conditioning block names component {component!r}, which the bundle does not have "
                f"(it has {', '.join(self.manifest.components)}); the manifest is corrupt, re-export the bundle"
            )
        if tokenizer is not None and tokenizer not in self.manifest.tokenizers:
            raise BundleError(
                f"the manifest's conditioning block names tokenizer {tokenizer!r}, which the bundle does not have "
                f"(it has {', '.join(self.manifest.tokenizers) or 'none'}); the manifest is corrupt, re-export the bundle"
            )
        return component, tokenizer

    def sequence_length_range(self) -> tuple[int, int] | None:
        """The `max_sequence_length` values this bundle accepts (inclusive), or None when the family
        takes no such argument (it is then ignored)."""
        return None

    def text_length_range(self, *axes: tuple[str, str, int], offset: int = 0) -> tuple[int, int] | None:
        """The sizes L for which every (component, input, dim) axis holds L + `offset`, as (min, max)."""
        ranges = [r for r in (self.input_axis(*axis) for axis in axes) if r is not None]
        if not ranges:
            return None
        return max(0, max(r.min for r in ranges) - offset), min(r.max for r in ranges) - offset

    def input_axis(self, component: str, tensor: str, dim: int) -> AxisRange | None:
        """The valid sizes of dimension `dim` of the component's input `tensor` (None: not in the bundle)."""
        comp = self.manifest.components.get(component)
        if comp is None:
            return None
        try:
            size = comp.input(tensor).shape[dim]
        except (KeyError, IndexError):
            return None
        return comp.axes.get(size) if isinstance(size, str) else AxisRange(size, size, size)

    def forget_encodings(self, component: str) -> None:
        """Drop the kept negative-prompt encodings of `component` (its weights changed: LoRA)."""
        with self._negatives_lock:
            for key in [k for k in self._negatives if k[0] == component]:
                del self._negatives[key]

    def encode(
        self, component: str, tokenizer: str, prompts: list[str], max_length: int | None = None, *, negatives: int = 0
    ) -> dict[str, np.ndarray]:
        """Run a text encoder on `prompts`; outputs have one row per prompt.

        The first `negatives` prompts are classifier-free guidance's negative prompts: the same ("" by
        default) call after call, so their rows are kept and only the prompts not seen before run
        through the encoder. Rows are computed independently: a kept row equals a fresh one up to
        float rounding.
        """
        key = (component, tokenizer, max_length)
        with self._negatives_lock:
            kept = {i: self._negatives[(*key, p)] for i, p in enumerate(prompts[:negatives]) if (*key, p) in self._negatives}
        todo = [i for i in range(len(prompts)) if i not in kept]
        fresh = self.engines[component]({"input_ids": self.tokenizers[tokenizer]([prompts[i] for i in todo], max_length)}) if todo else {}
        with self._negatives_lock:
            for j, i in enumerate(todo):
                if i >= negatives:
                    break
                self._negatives[(*key, prompts[i])] = {name: value[j : j + 1].copy() for name, value in fresh.items()}
            while len(self._negatives) > self.negative_cache_size:
                del self._negatives[next(iter(self._negatives))]
        if not kept:
            return fresh
        rows = {i: {name: value[j : j + 1] for name, value in fresh.items()} for j, i in enumerate(todo)} | kept
        return {name: np.concatenate([rows[i][name] for i in range(len(prompts))]) for name in rows[0]}

    def uses_cfg(self, guidance_scale: float) -> bool:
        return guidance_scale > 1.0

    def latent_shape(self, n: int, latent_height: int, latent_width: int) -> tuple[int, ...]:
        return (n, self.manifest.latent.channels, latent_height, latent_width)

    def schedule(self, num_inference_steps: int, latent_height: int, latent_width: int) -> Schedule:
        return make_schedule(self.manifest.scheduler, num_inference_steps)

    def model_output(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        return outputs["sample"]

    def decoder_input(self, latents: np.ndarray, latent_height: int, latent_width: int) -> np.ndarray:
        latent = self.manifest.latent
        return (latents / np.float32(latent.scaling_factor) + np.float32(latent.shift_factor)).astype(np.float32)

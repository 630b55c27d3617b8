"""`Pipeline`: text-to-image generation from a bundle, with numpy and a backend, no torch."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from latentrt.errors import BundleError, InputError
from latentrt.bundle.manifest import Manifest, load_manifest
from latentrt.runtime.backends import load_engines
from latentrt.runtime.engine import BackendOptions, Engine, OnDevice
from latentrt.runtime.families import FAMILIES
from latentrt.runtime.schedulers.flow_match import FlowMatchSchedule
from latentrt.runtime.tokenizer import PromptTokenizer

logger = logging.getLogger(__name__)

Backend = Literal["onnxruntime", "tensorrt"]  # runtime/backends/__init__.py: BACKENDS


@dataclass
class PipelineOutput:
    """Generated images and where the time went.

    Attributes:
        images: PIL images, `len(prompts) * num_images_per_prompt` of them.
        pixels: the same images as float32 [n, height, width, 3] in [0, 1], before 8-bit rounding.
        timings: seconds per stage: "text_encoding", "denoising_steps" (a list, one per step),
            "vae_decode", "total".
    """

    images: list
    pixels: np.ndarray
    timings: dict[str, float | list[float]] = field(default_factory=dict)


class Pipeline:
    """A loaded bundle, ready to generate.

    Example:
        >>> pipe = Pipeline.load("bundles/tiny-sd3")  # doctest: +SKIP
        >>> out = pipe("a red circle on the left", num_inference_steps=8, seed=0)  # doctest: +SKIP
        >>> out.images[0].save("out.png")  # doctest: +SKIP
    """

    def __init__(self, bundle: Path, manifest: Manifest, engines: dict[str, Engine]) -> None:
        if manifest.family not in FAMILIES:
            raise BundleError(f"{bundle}: unknown pipeline family {manifest.family!r}; this latentrt runs {', '.join(FAMILIES)}")
        self.bundle = bundle
        self.manifest = manifest
        self.engines = engines
        tokenizers = {
            name: PromptTokenizer(bundle / spec.file, max_length=spec.max_length, pad_id=spec.pad_id)
            for name, spec in manifest.tokenizers.items()
        }
        self.family = FAMILIES[manifest.family](manifest, engines, tokenizers)
        self._device_denoiser = None  # built on first use, where the denoiser engine offers a device loop

    @classmethod
    def load(
        cls,
        bundle: str | os.PathLike,
        backend: Backend = "onnxruntime",
        *,
        providers: Sequence[str] | None = None,
        threads: int = 0,
        verify: bool = True,
    ) -> Pipeline:
        """Load a bundle written by `latentrt export`.

        Args:
            backend: "onnxruntime" (any machine) or "tensorrt" (engines built by `latentrt build`).
            providers: ONNX Runtime execution providers (default CPU).
            threads: ONNX Runtime intra-op threads; 0 lets it choose.
            verify: check every ONNX file's sha256 against the manifest first.
        """
        bundle = Path(bundle)
        manifest = load_manifest(bundle, verify=verify)
        engines = load_engines(backend, bundle, manifest, BackendOptions(providers=providers, threads=threads))
        return cls(bundle, manifest, engines)

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        vae = self.manifest.latent.vae_scale_factor
        axes = self.manifest.components["vae_decoder"].axes  # NCHW latents in every family
        sizes = []
        for what, pixels, axis in (("height", height, axes["latent_height"]), ("width", width, axes["latent_width"])):
            step = vae * axis.multiple_of
            if pixels % step or not axis.contains(pixels // vae):
                nearest = min(max(round(pixels / step) * step, axis.min * vae), axis.max * vae)
                raise InputError(
                    f"{what} {pixels} is not valid for this bundle: it must be a multiple of {step} between "
                    f"{axis.min * vae} and {axis.max * vae}; the nearest valid {what} is {nearest}"
                )
            sizes.append(pixels // vae)
        return sizes[0], sizes[1]

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        max_sequence_length: int | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> PipelineOutput:
        """Generate images.

        Args:
            prompt: one prompt or a list.
            negative_prompt: the unconditional prompt for classifier-free guidance (default: the
                family's, "" for most); ignored when guidance is off.
            num_inference_steps, guidance_scale, height, width, max_sequence_length: default to the
                manifest's `defaults`.
            seed: seeds numpy's default generator for the initial latents (same seed, same image).
            latents: initial latents [n, channels, height / f, width / f] float32 in the denoiser's
                layout; overrides `seed`, as diffusers' `latents=` does.
            callback: called as `callback(step, num_inference_steps)` after each denoising step
                (again for each chunk when more images are asked than the bundle's batch range holds).
        """
        start = time.perf_counter()
        d = self.manifest.defaults
        steps = d.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = d.guidance_scale if guidance_scale is None else guidance_scale
        height = d.height if height is None else height
        width = d.width if width is None else width
        seq_len = d.max_sequence_length if max_sequence_length is None else max_sequence_length
        if steps < 1:
            raise InputError(f"num_inference_steps must be >= 1, got {steps}")
        if num_images_per_prompt < 1:
            raise InputError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InputError("prompt is empty: pass a string or a non-empty list of strings")
        latent_h, latent_w = self._latent_size(height, width)
        n = len(prompts) * num_images_per_prompt
        family = self.family
        shape = family.latent_shape(n, latent_h, latent_w)
        cfg = family.uses_cfg(guidance)
        if latents is None:
            latents = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        elif latents.shape != shape:
            raise InputError(f"latents have shape {latents.shape}, expected {shape} for {n} images of {height}x{width}")
        latents = np.asarray(latents, dtype=np.float32)
        negatives = _broadcast_negative(negative_prompt, len(prompts)) if cfg and negative_prompt is not None else None
        texts = _repeat(prompts, num_images_per_prompt)
        negatives = None if negatives is None else _repeat(negatives, num_images_per_prompt)

        # More images than the exported batch range holds run in consecutive chunks; the latents were
        # drawn up front, so an image does not depend on how the call is split.
        chunk = self._images_per_call(cfg)
        timings: dict = {"text_encoding": 0.0, "denoising_steps": [0.0] * steps, "vae_decode": 0.0}
        pixels = []
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            pixels.append(
                self._generate(
                    texts[lo:hi], None if negatives is None else negatives[lo:hi], latents[lo:hi], timings,
                    steps=steps, guidance=guidance, cfg=cfg, height=height, width=width, seq_len=seq_len,
                    callback=callback,
                )
            )
        pixels = np.concatenate(pixels)
        timings["total"] = time.perf_counter() - start
        return PipelineOutput(images=to_pil(pixels), pixels=pixels, timings=timings)

    def _generate(self, texts, negatives, latents, timings, *, steps, guidance, cfg, height, width, seq_len, callback) -> np.ndarray:
        """One batch through the three stages; adds its stage times to `timings`."""
        family = self.family
        n = len(texts)
        latent_h, latent_w = height // self.manifest.latent.vae_scale_factor, width // self.manifest.latent.vae_scale_factor

        # 1. Encode prompts (negatives batched first with guidance, as in diffusers).
        t0 = time.perf_counter()
        cond = family.conditioning(texts, negatives, cfg=cfg, height=height, width=width, max_sequence_length=seq_len)
        timings["text_encoding"] += time.perf_counter() - t0

        # 2. Denoise.
        schedule = family.schedule(steps, latent_h, latent_w)
        latents = latents * np.float32(schedule.init_noise_sigma)
        feeds = lambda x, t: family.denoiser_feeds(x, t, cond, guidance)  # noqa: E731
        device_loop = self._device_loop(schedule, latents, feeds)
        if device_loop is not None:  # every step on the device (TensorRT)
            latents = device_loop.run(
                latents, feeds, schedule.timesteps, schedule.sigmas,
                guidance=guidance, cfg=cfg, callback=callback, step_times=timings["denoising_steps"],
            )
        else:
            denoiser = self.engines[family.denoiser]
            for i, t in enumerate(schedule.timesteps):
                t0 = time.perf_counter()
                model_in = schedule.scale_model_input(np.concatenate([latents, latents]) if cfg else latents, i)
                out = family.model_output(denoiser(feeds(model_in, t)))
                if cfg:
                    uncond, text_out = out[:n], out[n:]
                    out = uncond + guidance * (text_out - uncond)
                latents = schedule.step(out, i, latents)
                timings["denoising_steps"][i] += time.perf_counter() - t0
                if callback:
                    callback(i + 1, steps)

        # 3. Decode.
        t0 = time.perf_counter()
        decoded = self.engines["vae_decoder"]({"latent_sample": family.decoder_input(latents, latent_h, latent_w)})["sample"]
        timings["vae_decode"] += time.perf_counter() - t0
        return np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)

    def _device_loop(self, schedule, latents: np.ndarray, feeds: Callable):
        """The denoiser engine's device loop when the whole loop can run on the device (flow matching,
        an engine with `device_loop`, the model output is one denoiser output unchanged), else None."""
        make_loop = getattr(self.engines[self.family.denoiser], "device_loop", None)
        if not isinstance(schedule, FlowMatchSchedule) or make_loop is None:
            return None
        if self._device_denoiser is None:
            marker = OnDevice(latents.shape)
            latent_input = next((n for n, v in feeds(marker, np.float32(0)).items() if v is marker), None)
            sentinels = {spec.name: object() for spec in self.engines[self.family.denoiser].outputs}
            try:
                picked = self.family.model_output(sentinels)
            except (TypeError, IndexError, AttributeError):  # the family post-processes the output
                picked = None
            velocity = next((n for n, v in sentinels.items() if v is picked), None)
            self._device_denoiser = False if latent_input is None or velocity is None else make_loop(latent_input, velocity)
        return self._device_denoiser or None

    def _images_per_call(self, cfg: bool) -> int:
        """The most images one pass can take: the batch ranges of the bundle, narrowed by what the
        loaded engines take (`max_batch`, e.g. TensorRT profiles); with guidance the text encoders
        and the denoiser see two rows per image."""
        limits = []
        for name, comp in self.manifest.components.items():
            if "batch" not in comp.axes:
                continue
            engine_max = getattr(self.engines.get(name), "max_batch", None)
            rows = min(comp.axes["batch"].max, engine_max) if engine_max else comp.axes["batch"].max
            limits.append(rows // (2 if cfg and name != "vae_decoder" else 1))
        return max(1, min(limits, default=1))

    def close(self) -> None:
        """Free what the engines hold (sessions, device memory, streams); the pipeline cannot be
        called afterwards. `with Pipeline.load(...) as pipe:` closes it on leaving the block."""
        closing, self._device_denoiser = self._device_denoiser, None
        if closing and hasattr(closing, "close"):
            closing.close()
        for engine in self.engines.values():
            engine.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _repeat(items: list[str], times: int) -> list[str]:
    return [item for item in items for _ in range(times)]


def _broadcast_negative(negative_prompt: str | list[str], count: int) -> list[str]:
    if isinstance(negative_prompt, str):
        return [negative_prompt] * count
    if len(negative_prompt) != count:
        raise InputError(f"got {len(negative_prompt)} negative prompts for {count} prompts; pass one per prompt or a single string")
    return list(negative_prompt)


def to_pil(pixels: np.ndarray) -> list:
    """float [n, h, w, 3] in [0, 1] -> PIL images, rounded as diffusers rounds them."""
    from PIL import Image

    return [Image.fromarray(img) for img in (pixels * 255).round().astype(np.uint8)]

"""`Pipeline`: text-to-image generation from a bundle, with numpy and a backend, no torch."""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from latentrt.errors import BundleError, InputError
from latentrt.bundle.manifest import Manifest, load_manifest
from latentrt.runtime.backends import load_engines
from latentrt.runtime.engine import BackendOptions, Engine, OnDevice
from latentrt.runtime.families import FAMILIES
from latentrt.runtime.lora.adapters import LoraAdapters
from latentrt.runtime.schedulers.flow_match import FlowMatchSchedule
from latentrt.runtime.tokenizer import PromptTokenizer

logger = logging.getLogger(__name__)

Backend = Literal["onnxruntime", "tensorrt", "openvino"]  # runtime/backends/__init__.py: BACKENDS

#: the most denoising steps one call takes (diffusers has no limit; a typo like 10**12 should not
#: allocate terabytes of timesteps)
MAX_INFERENCE_STEPS = 10_000


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

    Thread safety: one `Pipeline` may be called from several threads at once, with different
    prompts, sizes, step counts or `max_sequence_length`; each call's state is local to it and the
    shared caches (negative-prompt encodings, tokenizers per length) are guarded by locks. Engines
    that declare `concurrent_calls = True` (ONNX Runtime: `InferenceSession.run` is thread-safe) run
    calls concurrently; with any other engine (TensorRT: one stream, preallocated buffers) calls
    are serialized by a lock, so concurrent callers wait instead of sharing buffers.

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
        self._check_bundle()
        self._device_denoiser = None  # built on first use, where the denoiser engine offers a device loop
        concurrent = all(getattr(engine, "concurrent_calls", False) for engine in engines.values())
        self._serial = contextlib.nullcontext() if concurrent else threading.Lock()
        self._lora: LoraAdapters | None = None  # built by the first load_lora_weights
        self._lora_lock = threading.Lock()
        self._active: list[tuple[str, dict[str, float]]] = []  # the adapter mix in the engines
        self._applied: dict[str, tuple] = {}  # component -> what its engine's weights were mixed from
        self._applied_values: dict[str, dict[str, np.ndarray]] = {}

    def _check_bundle(self) -> None:
        """What the sampling loop needs from the manifest, checked at load rather than at the first call."""
        m, where = self.manifest, self.bundle
        for name in (self.family.denoiser, "vae_decoder"):
            if name not in m.components or name not in self.engines:
                raise BundleError(f"{where}: the {m.family} pipeline needs a {name!r} component, the bundle has {', '.join(m.components)}; re-export it")
        for comp, axes in ((self.family.denoiser, ("batch",)), ("vae_decoder", ("batch", "latent_height", "latent_width"))):
            missing = [a for a in axes if a not in m.components[comp].axes]
            if missing:
                raise BundleError(f"{where}: component {comp!r} has no range for axis {missing[0]!r}; the manifest is corrupt, re-export the bundle")
        try:
            latent_h, latent_w = self._latent_size(m.defaults.height, m.defaults.width)
            self.family.schedule(m.defaults.num_inference_steps, latent_h, latent_w)
        except InputError as err:
            raise BundleError(f"{where}: the manifest's defaults or scheduler are not usable ({err}); re-export the bundle") from err
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
            raise BundleError(f"{where}: the manifest's scheduler block is malformed ({err!r}); re-export the bundle") from err

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
            backend: "onnxruntime" (any machine), "tensorrt" (engines built by `latentrt build`) or
                "openvino" (CPU: bf16 / int8 matrix units where the CPU has them).
            providers: ONNX Runtime execution providers (default CPU).
            threads: ONNX Runtime intra-op threads; 0 lets it choose.
            verify: check every ONNX file's sha256 against the manifest first.
        """
        if not isinstance(bundle, (str, os.PathLike)):
            raise InputError(f"bundle must be a path (str or os.PathLike), got {type(bundle).__name__}")
        if not isinstance(backend, str):
            raise InputError(f"backend must be a str (onnxruntime, tensorrt or openvino), got {type(backend).__name__}")
        if not _is_int(threads) or threads < 0:
            raise InputError(f"threads must be an integer >= 0 (0 lets ONNX Runtime choose), got {threads!r}")
        if providers is not None and (isinstance(providers, str) or not all(isinstance(p, str) for p in providers)):
            raise InputError(f"providers must be a list of ONNX Runtime provider names, got {providers!r}")
        bundle = Path(bundle)
        manifest = load_manifest(bundle, verify=verify)
        engines = load_engines(backend, bundle, manifest, BackendOptions(providers=providers, threads=int(threads)))
        try:
            return cls(bundle, manifest, engines)
        except BaseException:
            for engine in engines.values():
                engine.close()
            raise

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

        Raises:
            InputError: an argument of the wrong type or out of range (naming it and what is valid),
                checked before anything is allocated or run.
        """
        start = time.perf_counter()
        d = self.manifest.defaults
        steps = d.num_inference_steps if num_inference_steps is None else _int_arg(num_inference_steps, "num_inference_steps", 1, MAX_INFERENCE_STEPS)
        guidance = d.guidance_scale if guidance_scale is None else _finite_arg(guidance_scale, "guidance_scale")
        height = d.height if height is None else _int_arg(height, "height", 1)
        width = d.width if width is None else _int_arg(width, "width", 1)
        per_prompt = _int_arg(num_images_per_prompt, "num_images_per_prompt", 1)
        if seed is not None:
            seed = _int_arg(seed, "seed", 0)
        if callback is not None and not callable(callback):
            raise InputError(f"callback must be callable as callback(step, num_inference_steps), got {type(callback).__name__}")
        prompts = _prompt_list(prompt, "prompt")
        negatives = None if negative_prompt is None else _prompt_list(negative_prompt, "negative_prompt")
        if isinstance(negative_prompt, str):
            negatives = negative_prompt  # one for every prompt
        seq_len = self._sequence_length(max_sequence_length)
        latent_h, latent_w = self._latent_size(height, width)
        n = len(prompts) * per_prompt
        family = self.family
        shape = family.latent_shape(n, latent_h, latent_w)
        _check_memory(n, height, width, shape)
        schedule = family.schedule(steps, latent_h, latent_w)  # also checks the step count against the scheduler
        cfg = family.uses_cfg(guidance)
        if latents is None:
            latents = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        else:
            latents = _latents_arg(latents, shape, f"{n} images of {height}x{width}")
        negatives = _broadcast_negative(negatives, len(prompts)) if cfg and negatives is not None else None
        texts = _repeat(prompts, per_prompt)
        negatives = None if negatives is None else _repeat(negatives, per_prompt)

        # More images than the exported batch range holds run in consecutive chunks; the latents were
        # drawn up front, so an image does not depend on how the call is split.
        chunk = self._images_per_call(cfg)
        timings: dict = {"text_encoding": 0.0, "denoising_steps": [0.0] * steps, "vae_decode": 0.0}
        pixels = []
        with self._serial:
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                pixels.append(
                    self._generate(
                        texts[lo:hi], None if negatives is None else negatives[lo:hi], latents[lo:hi], timings, schedule,
                        steps=steps, guidance=guidance, cfg=cfg, height=height, width=width, seq_len=seq_len,
                        callback=callback,
                    )
                )
        pixels = np.concatenate(pixels)
        timings["total"] = time.perf_counter() - start
        return PipelineOutput(images=to_pil(pixels), pixels=pixels, timings=timings)

    def _sequence_length(self, max_sequence_length) -> int:
        """The call's T5 length: the manifest's default, or a value checked against the bundle's axes."""
        if max_sequence_length is None:
            return self.manifest.defaults.max_sequence_length
        value = _int_arg(max_sequence_length, "max_sequence_length", 0)
        valid = self.family.sequence_length_range()
        if valid is not None and not valid[0] <= value <= valid[1]:
            raise InputError(
                f"max_sequence_length {value} is outside this bundle's range {valid[0]}..{valid[1]} (its text encoder and "
                f"denoiser were exported for it); pass a value in that range or re-export with --max-sequence-length"
            )
        return value

    def _generate(self, texts, negatives, latents, timings, schedule, *, steps, guidance, cfg, height, width, seq_len, callback) -> np.ndarray:
        """One batch through the three stages; adds its stage times to `timings`."""
        family = self.family
        n = len(texts)
        latent_h, latent_w = height // self.manifest.latent.vae_scale_factor, width // self.manifest.latent.vae_scale_factor

        # 1. Encode prompts (negatives batched first with guidance, as in diffusers).
        t0 = time.perf_counter()
        cond = family.conditioning(texts, negatives, cfg=cfg, height=height, width=width, max_sequence_length=seq_len)
        timings["text_encoding"] += time.perf_counter() - t0

        # 2. Denoise.
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

    # -- LoRA (runtime/lora/) ----------------------------------------------------------------------

    @property
    def lora(self) -> LoraAdapters:
        """The loaded adapters (`adapters`: name -> Adapter, with their layers and memory)."""
        if self._lora is None:
            self._lora = LoraAdapters(self.bundle, self.manifest, self.family.denoiser)
        return self._lora

    def load_lora_weights(self, path: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Load a LoRA (a .safetensors file: diffusers/PEFT, kohya or BFL Flux keys) and make it the
        active adapter, alone, at weight 1.0 (as diffusers does).

        The file is read and checked against the bundle first (every key must match a weight; ranks,
        shapes and values are checked); on any error nothing changes and the pipeline keeps its
        previous adapters. The merged weights go to the engines of the components it touches
        (`set_weights`): ONNX Runtime re-creates those sessions from memory, TensorRT refits.

        Args:
            path: the LoRA file.
            adapter_name: the name `set_adapters` will know it by (default "default_<n>").

        Raises:
            InputError: the name is taken, the file is a pickle, or it does not fit this bundle.
            BundleError: the bundle has no weight map (exported before LoRA support: re-export it).

        Example:
            >>> pipe.load_lora_weights("style.safetensors", adapter_name="style")  # doctest: +SKIP
            >>> pipe.set_adapters(["style", "subject"], adapter_weights=[0.8, 0.5])  # doctest: +SKIP
        """
        with self._lora_lock:
            name = f"default_{len(self.lora.adapters)}" if adapter_name is None else adapter_name
            adapter = self.lora.read(path, name)
            self.lora.add(adapter)
            try:
                self._mix([(name, {c: 1.0 for c in adapter.components})])
            except BaseException:
                self.lora.remove([name])
                raise

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights=None) -> None:
        """Choose the active adapters and their weights: `W + sum(weight x alpha/rank x B @ A)`.

        Args:
            adapter_names: loaded adapter names; `[]` runs the bundle's own weights again.
            adapter_weights: None (1.0 each), one number, or one entry per adapter: a number or
                {component: number} (e.g. {"transformer": 0.8, "text_encoder": 0.0}).

        Raises:
            InputError: an unknown or repeated name, a weights list of another length, a non-finite
                weight, merged weights that overflow; the active adapters stay as they were.
        """
        with self._lora_lock:
            mix = self.lora.check_mix(adapter_names, adapter_weights) if adapter_names or self._lora else []
            self._mix(mix)

    def unload_lora_weights(self) -> None:
        """Drop every adapter and run the bundle's own weights again (restored exactly)."""
        with self._lora_lock:
            self._mix([])
            if self._lora is not None:
                self._lora.remove(list(self._lora.adapters))

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Forget adapters; active ones are removed from the mix first.

        Raises:
            InputError: a name that is not loaded.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        with self._lora_lock:
            unknown = [n for n in names if n not in self.lora.adapters]
            if unknown:
                raise InputError(f"no adapter named {unknown}; loaded: {sorted(self.lora.adapters) or 'none'}")
            self._mix([(n, w) for n, w in self._active if n not in names])
            self.lora.remove(names)

    def get_active_adapters(self) -> list[str]:
        """The names of the adapters in the engines' weights now."""
        return [name for name, _ in self._active]

    def get_list_adapters(self) -> dict[str, list[str]]:
        """Per component, the loaded adapters that change it."""
        out: dict[str, list[str]] = {}
        for name, adapter in (self._lora.adapters.items() if self._lora else ()):
            for component in adapter.components:
                out.setdefault(component, []).append(name)
        return out

    def _mix(self, mix: list[tuple[str, dict[str, float]]]) -> None:
        """Give each component whose adapter mix changes its merged weights; on a failure, the
        components already changed get their previous weights back."""
        overrides = self._lora.overrides(mix) if mix else {}
        changed = [c for c in sorted(set(overrides) | set(self._applied)) if overrides.get(c, ((), {}))[0] != self._applied.get(c, ())]
        lacking = [c for c in changed if not hasattr(self.engines[c], "set_weights")]
        if lacking:
            raise InputError(f"the engines of {lacking} cannot change their weights; load the bundle with backend='onnxruntime' or 'tensorrt'")
        done = []

        def apply(component: str) -> str:
            self.engines[component].set_weights(overrides.get(component, ((), {}))[1])
            self.family.forget_encodings(component)
            return component

        try:
            if len(changed) > 1 and all(getattr(self.engines[c], "concurrent_calls", False) for c in changed):
                # ONNX Runtime builds sessions without the GIL: the touched components' in parallel
                with ThreadPoolExecutor(max_workers=len(changed)) as pool:
                    futures = [pool.submit(apply, c) for c in changed]
                    errors = []
                    for future in futures:
                        try:
                            done.append(future.result())
                        except BaseException as err:  # noqa: BLE001 - re-raised below, after all finished
                            errors.append(err)
                    if errors:
                        raise errors[0]
            else:
                for component in changed:
                    done.append(apply(component))
        except BaseException:
            for component in done:
                try:
                    self.engines[component].set_weights(self._applied_values.get(component, {}))
                    self.family.forget_encodings(component)
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    logger.exception("could not restore the previous weights of %s", component)
            raise
        for component in changed:
            key, values = overrides.get(component, ((), {}))
            if key:
                self._applied[component], self._applied_values[component] = key, values
            else:
                self._applied.pop(component, None)
                self._applied_values.pop(component, None)
        self._active = list(mix)
        if changed:
            logger.info("LoRA: %s now run %s", ", ".join(changed), [name for name, _ in mix] or "the bundle's weights")

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


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_arg(value, name: str, lo: int, hi: int | None = None) -> int:
    """`value` as an int in [lo, hi], or an InputError naming the argument."""
    if not _is_int(value):
        raise InputError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f">= {lo} and <= {hi}"
        raise InputError(f"{name} must be {bounds}, got {value}")
    return int(value)


def _finite_arg(value, name: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise InputError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    return float(value)


def _prompt_list(value, name: str) -> list[str]:
    """One prompt or a non-empty list of them, each a str that encodes to UTF-8."""
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
        if not items:
            raise InputError(f"{name} is an empty list: pass a string or a non-empty list of strings")
    else:
        hint = " (decode bytes first: value.decode('utf-8'))" if isinstance(value, (bytes, bytearray)) else ""
        raise InputError(f"{name} must be a str or a list of str, got {type(value).__name__}{hint}")
    for i, item in enumerate(items):
        where = name if isinstance(value, str) else f"{name}[{i}]"
        if not isinstance(item, str):
            raise InputError(f"{where} must be a str, got {type(item).__name__} {item!r}; every prompt must be text")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InputError(
                f"{where} is not valid text: it holds a lone surrogate {item[err.start]!r} at index {err.start}; "
                "pass text that encodes to UTF-8"
            ) from None
    return items


def _latents_arg(latents, shape: tuple[int, ...], what: str) -> np.ndarray:
    if not isinstance(latents, np.ndarray):
        raise InputError(f"latents must be a numpy array of shape {shape}, got {type(latents).__name__}; wrap it with np.asarray")
    if latents.shape != shape:
        raise InputError(f"latents have shape {latents.shape}, expected {shape} for {what}")
    if not np.issubdtype(latents.dtype, np.floating):
        raise InputError(f"latents must be floating point (float32), got dtype {latents.dtype}")
    latents = np.asarray(latents, dtype=np.float32)
    if not np.isfinite(latents).all():
        raise InputError(f"latents hold {int((~np.isfinite(latents)).sum())} NaN or infinite values; pass finite numbers")
    return latents


def _check_memory(n: int, height: int, width: int, latent_shape: tuple[int, ...]) -> None:
    """Refuse a call whose outputs alone would not fit in this machine's memory (before allocating)."""
    need = n * height * width * 3 * (4 + 1) + 2 * 4 * math.prod(latent_shape)  # float pixels, 8-bit images, latents
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return
    if need > total:
        raise InputError(
            f"{n} images of {height}x{width} need at least {need / 2**30:.1f} GiB for their pixels alone, more than this "
            f"machine's {total / 2**30:.1f} GiB of memory; ask for fewer images per call (num_images_per_prompt, prompts)"
        )


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

"""Score a latentrt bundle on the demo task, alone or against a reference bundle (`latentrt eval`).

Torch-free: images come from `latentrt.runtime.Pipeline`, scores from the deterministic analyser.
Image i of the prompt list starts from `default_rng(seed + i)` latents, so two bundles of the same
model generate comparable images and their PSNR measures what an export or quantization changed.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from latentrt.models.demo import analyser, evaluate


def generate(pipe, captions: list[str], *, steps: int, guidance: float, seed: int, chunk: int = 4, progress=None) -> np.ndarray:
    """Float images [len(captions), h, w, 3] in [0, 1]; caption i uses latents from `default_rng(seed + i)`."""
    d = pipe.manifest.defaults
    family = pipe.family
    vae = pipe.manifest.latent.vae_scale_factor
    shape = family.latent_shape(1, d.height // vae, d.width // vae)
    images = []
    for start in range(0, len(captions), chunk):
        batch = captions[start : start + chunk]
        latents = np.concatenate([np.random.default_rng(seed + start + i).standard_normal(shape, dtype=np.float32) for i in range(len(batch))])
        images.append(pipe(batch, num_inference_steps=steps, guidance_scale=guidance, latents=latents).pixels)
        if progress:
            progress(min(start + chunk, len(captions)), len(captions))
    return np.concatenate(images)


def evaluate_bundle(
    bundle: str | os.PathLike,
    *,
    reference: str | os.PathLike | None = None,
    steps: int = evaluate.DEFAULT_STEPS,
    guidance: float = evaluate.DEFAULT_GUIDANCE,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    backend: str = "onnxruntime",
    reference_backend: str = "onnxruntime",
) -> dict:
    """Attribute accuracy of `bundle` on the fixed eval prompts (seen and held-out combinations).

    `backend` runs `bundle`, `reference_backend` the reference (the same bundle on two backends
    measures what a backend's precision changes, e.g. OpenVINO's bf16 against ONNX Runtime's float32).

    With `reference`, also generate with the reference bundle from the same latents and report PSNR:
    `{"psnr_db_mean", "psnr_db", "reference": {...}, "quantized": {...}}`, each score block having
    "overall" (all prompts), "seen" and "held_out" accuracies.

    Returns:
        `{"seen": {"overall", "shape", ...}, "held_out": {...}, "overall": float, "settings": {...}}`,
        or the comparison above.
    """
    from latentrt.calibration.quality import compare_pixels
    from latentrt.runtime.pipeline import Pipeline

    prompts = evaluate.eval_prompts(seed)
    captions = [c for c, _, _ in prompts]

    def score(path, backend) -> tuple[dict, np.ndarray]:
        with Pipeline.load(path, backend=backend) as pipe:
            pixels = generate(pipe, captions, steps=steps, guidance=guidance, seed=seed, progress=progress)
        report = evaluate.score_generated(prompts, pixels)
        report["overall"] = analyser.score([(img, attrs) for img, (_, attrs, _) in zip(pixels, prompts)])["overall"]
        return report, pixels

    settings = {"steps": steps, "guidance_scale": guidance, "seed": seed, "prompts": len(prompts), "backend": backend}
    candidate, pixels = score(bundle, backend)
    if reference is None:
        return {**candidate, "settings": settings}
    settings["reference_backend"] = reference_backend
    ref_report, ref_pixels = score(reference, reference_backend)
    psnr = compare_pixels(ref_pixels, pixels)
    return {
        "psnr_db_mean": float(np.mean(psnr)),
        "psnr_db": psnr,
        "reference": ref_report,
        "quantized": candidate,
        "settings": settings,
    }

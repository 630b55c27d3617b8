"""How close a quantized bundle's images are to its reference's: PSNR on the same prompts and seeds.

Example:
    >>> report = compare_bundles("bundles/sd3", "bundles/sd3-int8", steps=20)  # doctest: +SKIP
    >>> print(f"{report.mean_psnr_db:.1f} dB")  # doctest: +SKIP
    >>> QualityReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report  # doctest: +SKIP
    True
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from latentrt.calibration.prompts import EVAL_PROMPTS, load_prompts
from latentrt.errors import InputError

#: PSNR of identical images is infinite; reports cap it so they stay plain JSON.
MAX_PSNR_DB = 100.0


def psnr(reference: np.ndarray, image: np.ndarray, *, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of `image` against `reference` (same shape, values in [0, peak])."""
    reference = np.asarray(reference, dtype=np.float64)
    image = np.asarray(image, dtype=np.float64)
    if reference.shape != image.shape:
        raise InputError(f"PSNR needs images of the same shape, got {reference.shape} and {image.shape}")
    mse = float(np.mean((reference - image) ** 2))
    if mse == 0.0:
        return MAX_PSNR_DB
    return min(MAX_PSNR_DB, 10.0 * math.log10(peak * peak / mse))


@dataclass(frozen=True)
class QualityReport:
    """Per-image and mean PSNR (dB) of the candidate bundle's images against the reference's.

    `psnr_db[i]` is for `prompts[i]` generated with seed `seeds[i]`; pixels are float in [0, 1]
    before 8-bit rounding.
    """

    reference: str
    candidate: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    psnr_db: tuple[float, ...]
    mean_psnr_db: float
    steps: int | None = None
    guidance_scale: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "prompts": list(self.prompts),
            "seeds": list(self.seeds),
            "psnr_db": list(self.psnr_db),
            "mean_psnr_db": self.mean_psnr_db,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QualityReport:
        return cls(
            reference=d["reference"],
            candidate=d["candidate"],
            prompts=tuple(d["prompts"]),
            seeds=tuple(int(s) for s in d["seeds"]),
            psnr_db=tuple(float(p) for p in d["psnr_db"]),
            mean_psnr_db=float(d["mean_psnr_db"]),
            steps=d.get("steps"),
            guidance_scale=d.get("guidance_scale"),
        )


def compare_pixels(reference: np.ndarray, candidate: np.ndarray) -> list[float]:
    """Per-image PSNR of two [n, h, w, 3] float batches in [0, 1]."""
    if reference.shape != candidate.shape:
        raise InputError(f"image batches differ in shape: {reference.shape} and {candidate.shape}")
    return [psnr(r, c) for r, c in zip(reference, candidate)]


def compare_bundles(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    prompts: Sequence[str] | None = None,
    *,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    backend: str = "onnxruntime",
    progress: Callable[[int, int], None] | None = None,
) -> QualityReport:
    """Generate the same images with both bundles and report PSNR.

    Args:
        prompts: held-out prompts (default: `prompts/eval.txt`, none of which is a calibration
            prompt of `prompts/default.txt`); prompt i uses seed `seed + i`.
        steps, guidance_scale, height, width: default to each bundle's manifest defaults.
        backend: "onnxruntime" or "tensorrt", for both bundles.
        progress: called as `progress(done, total)` after each prompt.
    """
    from latentrt.runtime.pipeline import Pipeline

    prompts = list(load_prompts(EVAL_PROMPTS) if prompts is None else prompts)
    if not prompts:
        raise InputError("no prompts to compare on; pass at least one")
    pipes = [Pipeline.load(reference, backend), Pipeline.load(candidate, backend)]
    seeds = tuple(seed + i for i in range(len(prompts)))
    scores = []
    for i, (prompt, s) in enumerate(zip(prompts, seeds)):
        kwargs = dict(num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width, seed=s)
        ref, cand = (pipe(prompt, **kwargs).pixels for pipe in pipes)
        scores.extend(compare_pixels(ref, cand))
        if progress:
            progress(i + 1, len(prompts))
    return QualityReport(
        reference=os.fspath(reference),
        candidate=os.fspath(candidate),
        prompts=tuple(prompts),
        seeds=seeds,
        psnr_db=tuple(scores),
        mean_psnr_db=float(np.mean(scores)),
        steps=steps,
        guidance_scale=guidance_scale,
    )

"""Score a text-to-image model on the demo task: a fixed prompt list, judged by :mod:`.analyser`.

:func:`eval_prompts` and :func:`score_generated` need only numpy and PIL, so any backend (diffusers, an
ONNX bundle) can be scored the same way::

    prompts = eval_prompts(seed=0)
    images = my_backend.generate([caption for caption, _, _ in prompts])   # 64x64 RGB images
    report = score_generated(prompts, images)
    report["held_out"]["overall"]

:func:`generate_diffusers` (torch, lazily imported) generates the images with
``diffusers.StableDiffusion3Pipeline``; ``python -m latentrt.models.demo.evaluate --pipeline DIR`` prints the
report as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from . import analyser, dataset

# The generation settings the demo model is evaluated with.
DEFAULT_STEPS = 16
DEFAULT_GUIDANCE = 3.0

EvalPrompt = tuple[str, dataset.Attributes, bool]


def eval_prompts(seed: int = 0, *, seen: int = 40, held_out_repeats: int = 2) -> list[EvalPrompt]:
    """A fixed, deterministic list of (caption, attributes, is_held_out) prompts.

    Every caption names all five attributes (shape, colour, size, position, background), so all are scored.
    The list holds ``held_out_repeats`` prompts for each of the 12 :data:`.dataset.HELD_OUT` combinations
    (24 by default) followed by ``seen`` prompts of distinct seen combinations (40 by default); sizes,
    backgrounds and wordings are drawn from ``seed``.
    """
    rng = np.random.default_rng(seed)
    seen_pool = dataset.seen_combos()
    if not 0 < seen <= len(seen_pool):
        raise ValueError(f"eval_prompts: got seen={seen}, expected 1 to {len(seen_pool)} distinct seen combinations.")
    combos = [(combo, True) for _ in range(held_out_repeats) for combo in dataset.held_out_combos()]
    combos += [(seen_pool[int(i)], False) for i in np.sort(rng.choice(len(seen_pool), size=seen, replace=False))]
    prompts: list[EvalPrompt] = []
    for (colour, shape, position), is_held_out in combos:
        attributes = dataset.Attributes(
            shape=shape,
            colour=colour,
            size=dataset.SIZES[int(rng.integers(len(dataset.SIZES)))],
            position=position,
            background=list(dataset.BACKGROUNDS)[int(rng.integers(len(dataset.BACKGROUNDS)))],
        )
        template = dataset.CAPTION_TEMPLATES.index(
            dataset.BACKGROUND_TEMPLATES[int(rng.integers(len(dataset.BACKGROUND_TEMPLATES)))]
        )
        prompts.append((dataset.caption(attributes, rng=rng, template=template), attributes, is_held_out))
    return prompts


def score_generated(
    prompts: Sequence[EvalPrompt], images: Sequence[np.ndarray | Image.Image]
) -> dict[str, dict[str, float]]:
    """Per-attribute accuracy of generated ``images`` (one per prompt, in order), split seen / held-out.

    Args:
        prompts: as returned by :func:`eval_prompts`.
        images: uint8 [64, 64, 3] arrays, float arrays in [0, 1], or PIL images; a batch array
            [N, 64, 64, 3] works too.

    Returns:
        ``{"seen": report, "held_out": report}`` where each report is :func:`.analyser.score`'s
        ``{"overall", "shape", "colour", "size", "position", "background", "all_correct", "count"}``;
        ``overall`` is the mean of the per-attribute accuracies.
    """
    if len(images) != len(prompts):
        raise ValueError(f"score_generated: got {len(images)} images for {len(prompts)} prompts, expected one each.")
    result: dict[str, dict[str, float]] = {}
    for name, wanted in (("seen", False), ("held_out", True)):
        pairs = [(image, attrs) for image, (_, attrs, held) in zip(images, prompts) if held == wanted]
        result[name] = analyser.score(pairs)
    return result


def load_diffusers(pipeline_dir: str | os.PathLike):
    """Load the demo's ``StableDiffusion3Pipeline`` (fp32, CPU, progress bar off).

    The directory's ``model_index.json`` lists ``text_encoder_3`` and ``tokenizer_3`` as ``[null, null]``
    (no T5); diffusers only accepts that when they are passed as ``None`` explicitly, as done here.
    """
    import torch
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(
        pipeline_dir, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_diffusers(
    pipeline_dir: str | os.PathLike,
    captions: Sequence[str],
    *,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = 0,
    pipe=None,
) -> np.ndarray:
    """Generate one 64x64 image per caption with ``diffusers.StableDiffusion3Pipeline`` on CPU.

    Image ``i`` uses ``torch.Generator().manual_seed(seed + i)`` and ``max_sequence_length=0``.
    Pass an already loaded ``pipe`` to skip loading ``pipeline_dir``.

    Returns:
        uint8 array [len(captions), 64, 64, 3].
    """
    import torch

    if pipe is None:
        pipe = load_diffusers(pipeline_dir)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(captions))]
    images = pipe(
        list(captions),
        height=dataset.IMAGE_SIZE,
        width=dataset.IMAGE_SIZE,
        num_inference_steps=steps,
        guidance_scale=guidance,
        max_sequence_length=0,
        generator=generators,
        output_type="np",
    ).images
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m latentrt.models.demo.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True, help="diffusers pipeline directory")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default=None, help="save the generated images as one PNG grid here")
    args = parser.parse_args(argv)
    prompts = eval_prompts(args.seed)
    images = generate_diffusers(
        args.pipeline, [c for c, _, _ in prompts], steps=args.steps, guidance=args.guidance, seed=args.seed
    )
    if args.grid:
        rows = [np.concatenate(list(images[i : i + 8]), axis=1) for i in range(0, len(images) - 7, 8)]
        Image.fromarray(np.concatenate(rows, axis=0)).save(args.grid)
    report = score_generated(prompts, images)
    report["settings"] = {"steps": args.steps, "guidance": args.guidance, "seed": args.seed, "size": 64,
                          "max_sequence_length": 0}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

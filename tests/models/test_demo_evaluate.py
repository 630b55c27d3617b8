"""The fixed evaluation prompts and their scoring (numpy + PIL only)."""

import numpy as np
import pytest

from latentrt.models.demo import dataset, evaluate


def test_eval_prompts_are_fixed_and_cover_seen_and_held_out():
    prompts = evaluate.eval_prompts(0)
    assert prompts == evaluate.eval_prompts(0)
    assert prompts != evaluate.eval_prompts(1)
    assert len(prompts) == 64
    held = [attrs for _, attrs, is_held_out in prompts if is_held_out]
    seen = [attrs for _, attrs, is_held_out in prompts if not is_held_out]
    assert len(held) == 24 and {a.combo for a in held} == dataset.HELD_OUT
    assert len(seen) == 40 and not {a.combo for a in seen} & dataset.HELD_OUT
    for caption, attrs, _ in prompts:
        assert attrs.colour in caption and attrs.shape in caption and dataset.mentions_background(caption)


def test_score_generated_is_perfect_on_rendered_ground_truth():
    prompts = evaluate.eval_prompts(0)
    images = np.stack([dataset.render(attrs) for _, attrs, _ in prompts])
    report = evaluate.score_generated(prompts, images)
    assert report["seen"]["overall"] == 1.0 and report["held_out"]["overall"] == 1.0
    assert report["seen"]["count"] == 40 and report["held_out"]["count"] == 24


def test_score_generated_splits_errors_by_held_out():
    prompts = evaluate.eval_prompts(0)
    blank = np.full((64, 64, 3), 0, dtype=np.uint8)
    images = [blank if is_held_out else dataset.render(attrs) for _, attrs, is_held_out in prompts]
    report = evaluate.score_generated(prompts, images)
    assert report["seen"]["overall"] == 1.0
    assert report["held_out"]["shape"] == 0.0 and report["held_out"]["all_correct"] == 0.0


def test_score_generated_needs_one_image_per_prompt():
    with pytest.raises(ValueError, match="got 1 images for 64 prompts"):
        evaluate.score_generated(evaluate.eval_prompts(0), [np.zeros((64, 64, 3), np.uint8)])

"""The deterministic analyser reads back dataset attributes."""

import numpy as np
import pytest
from PIL import Image

from latentrt.models.demo import analyser, dataset


def test_analyser_scores_at_least_98_percent_on_ground_truth_images():
    images, _, attributes = dataset.make_dataset(300, seed=123, split="all")
    report = analyser.score(zip(images, attributes))
    assert report["count"] == 300
    for name in dataset.ATTRIBUTE_NAMES:
        assert report[name] >= 0.98, (name, report)
    assert report["overall"] >= 0.98


def test_analyse_returns_the_attributes_of_a_canonical_image():
    attributes = dataset.Attributes("circle", "red", "large", "left", "navy")
    assert analyser.analyse(dataset.render(attributes)) == attributes.to_dict()
    pil = dataset.render(attributes, as_image=True)
    assert isinstance(pil, Image.Image) and analyser.analyse(pil) == attributes.to_dict()
    floats = dataset.render(attributes).astype(np.float32) / 255.0
    assert analyser.analyse(floats) == attributes.to_dict()


def test_blank_image_has_a_background_and_no_shape():
    blank = np.full((64, 64, 3), dataset.BACKGROUNDS["grey"], dtype=np.uint8)
    assert analyser.analyse(blank) == {
        "shape": None, "colour": None, "size": None, "position": None, "background": "grey"
    }


def test_score_overall_is_the_mean_of_per_attribute_accuracies_and_skips_unspecified():
    right = dataset.Attributes("square", "blue", "small", "top", "black")
    wrong = dataset.Attributes("square", "green", "small", "bottom", "black")
    image = dataset.render(right)
    report = analyser.score([(image, right), (image, wrong)])
    assert report["colour"] == 0.5 and report["position"] == 0.5 and report["shape"] == 1.0
    assert report["overall"] == pytest.approx(np.mean([1.0, 0.5, 1.0, 0.5, 1.0]))
    assert report["all_correct"] == 0.5
    partial = analyser.score([(image, {"shape": "square", "background": None})])
    assert set(partial) == {"overall", "shape", "all_correct", "count"}


def test_analyse_rejects_a_grayscale_array():
    with pytest.raises(ValueError, match=r"expected \[height, width, 3\] RGB"):
        analyser.analyse(np.zeros((64, 64), dtype=np.uint8))

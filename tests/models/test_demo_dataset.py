"""The procedural shapes dataset: determinism, the held-out split, captions."""

import numpy as np
import pytest

from latentrt.models.demo import dataset


def test_make_dataset_is_deterministic_from_the_seed():
    images_a, captions_a, attributes_a = dataset.make_dataset(32, seed=7)
    images_b, captions_b, attributes_b = dataset.make_dataset(32, seed=7)
    images_c, _, _ = dataset.make_dataset(32, seed=8)
    assert images_a.shape == (32, 64, 64, 3) and images_a.dtype == np.uint8
    np.testing.assert_array_equal(images_a, images_b)
    assert captions_a == captions_b and attributes_a == attributes_b
    assert not np.array_equal(images_a, images_c)


def test_held_out_is_a_fixed_tenth_of_the_combinations():
    combos = dataset.all_combos()
    assert len(combos) == 8 * 3 * 5
    assert len(dataset.HELD_OUT) == 12
    assert set(dataset.held_out_combos()) == dataset.HELD_OUT
    assert set(dataset.seen_combos()) | dataset.HELD_OUT == set(combos)
    assert not set(dataset.seen_combos()) & dataset.HELD_OUT
    # Every single colour, shape and position is still seen in training.
    seen = dataset.seen_combos()
    for index, names in enumerate((dataset.COLOURS, dataset.SHAPES, dataset.POSITIONS)):
        assert {combo[index] for combo in seen} == set(names)


def test_training_split_never_samples_a_held_out_combination():
    rng = np.random.default_rng(0)
    combos = {dataset.sample_attributes(rng, split="train").combo for _ in range(3000)}
    assert not combos & dataset.HELD_OUT
    assert len(combos) == len(dataset.seen_combos())  # and it covers every seen one
    held = {dataset.sample_attributes(rng, split="held_out").combo for _ in range(300)}
    assert held == dataset.HELD_OUT


def test_captions_mention_the_attributes():
    rng = np.random.default_rng(1)
    synonyms = {**dataset.SIZE_WORDS}
    for _ in range(300):
        attributes, text = dataset.sample(rng, split="all")
        words = text.replace(",", " ").replace(":", " ").split()
        assert attributes.shape in words and attributes.colour in words
        assert any(word in words for word in synonyms[attributes.size])
        assert any(word in words for word in dataset.POSITION_WORDS[attributes.position])
        if dataset.mentions_background(text):
            assert attributes.background in words


def test_every_template_can_name_the_background_or_not():
    attributes = dataset.Attributes("triangle", "cyan", "small", "top", "grey")
    texts = [dataset.caption(attributes, template=i) for i in range(len(dataset.CAPTION_TEMPLATES))]
    assert texts[0] == "a small cyan triangle at the top"
    assert texts[4] == "a small cyan triangle at the top on a grey background"
    assert sum(dataset.mentions_background(text) for text in texts) == len(dataset.BACKGROUND_TEMPLATES)


def test_render_draws_the_shape_where_asked():
    image = dataset.render(dataset.Attributes("square", "red", "large", "left", "black"))
    red = np.all(image == dataset.COLOURS["red"], axis=2)
    ys, xs = np.nonzero(red)
    assert red.sum() == 24 * 24  # canonical large half extent 12, no jitter
    assert (xs.min() + xs.max() + 1) / 2 == dataset.POSITION_ANCHORS["left"][0]
    assert tuple(image[0, 0]) == dataset.BACKGROUNDS["black"]


def test_attributes_reject_unknown_names_with_the_choices():
    with pytest.raises(ValueError, match=r"Attributes.colour: got 'pink', expected one of"):
        dataset.Attributes("circle", "pink", "small", "left", "black")
    with pytest.raises(ValueError, match="split='test'"):
        dataset.sample_attributes(np.random.default_rng(0), split="test")

"""A procedural text-to-image dataset: one coloured shape on a plain background, with a caption.

Everything is generated from a seed with numpy and PIL, so the dataset needs no download and no torch.
An image is 64x64 RGB; its content is fully described by :class:`Attributes`::

    >>> import numpy as np
    >>> attributes, caption = sample(np.random.default_rng(0))
    >>> image = render(attributes)            # uint8 array [64, 64, 3]

A fixed tenth of the colour x shape x position combinations is held out (:data:`HELD_OUT`): sampling with
``split="train"`` never produces them, so a model trained on that split can be tested on compositions it has
never seen.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle")
# Named shape colours, far apart in RGB and far from every background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "magenta": (210, 60, 210),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "cyan": (40, 210, 220),
}
# Named backgrounds: dark or neutral, never equal to a shape colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "grey": (105, 105, 105),
    "navy": (20, 30, 90),
    "brown": (90, 55, 30),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")

# Centre (x, y) of the shape's bounding box for each position, in pixels of a 64x64 image.
POSITION_ANCHORS: dict[str, tuple[int, int]] = {
    "left": (17, 32),
    "right": (47, 32),
    "top": (32, 17),
    "bottom": (32, 47),
    "centre": (32, 32),
}
# Half the side of the shape's bounding box, inclusive range, in pixels.
SIZE_HALF_EXTENT: dict[str, tuple[int, int]] = {"small": (5, 7), "large": (11, 13)}
POSITION_JITTER = 3

Split = Literal["train", "held_out", "all"]


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What one image shows. Every field is one of the module's named choices."""

    shape: str
    colour: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for name, choices in (
            ("shape", SHAPES),
            ("colour", COLOURS),
            ("size", SIZES),
            ("position", POSITIONS),
            ("background", BACKGROUNDS),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"Attributes.{name}: got {value!r}, expected one of {sorted(choices)}.")

    @property
    def combo(self) -> tuple[str, str, str]:
        """The (colour, shape, position) combination, the unit that :data:`HELD_OUT` holds out."""
        return (self.colour, self.shape, self.position)

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


ATTRIBUTE_NAMES = tuple(field.name for field in dataclasses.fields(Attributes))


def _held_out_combos() -> frozenset[tuple[str, str, str]]:
    # 12 of the 8 x 3 x 5 = 120 combinations: the i-th takes colour i % 8, shape i % 3, position i % 5.
    # The moduli are coprime, so the 12 are distinct, and every colour, shape and position stays seen in
    # most of its combinations.
    colours = list(COLOURS)
    return frozenset(
        (colours[i % len(colours)], SHAPES[i % len(SHAPES)], POSITIONS[i % len(POSITIONS)]) for i in range(12)
    )


HELD_OUT: frozenset[tuple[str, str, str]] = _held_out_combos()


def all_combos() -> list[tuple[str, str, str]]:
    """Every (colour, shape, position) combination, in a fixed order."""
    return list(itertools.product(COLOURS, SHAPES, POSITIONS))


def seen_combos() -> list[tuple[str, str, str]]:
    """The combinations that ``split="train"`` samples."""
    return [combo for combo in all_combos() if combo not in HELD_OUT]


def held_out_combos() -> list[tuple[str, str, str]]:
    """The combinations training never sees, in the fixed order of :func:`all_combos`."""
    return [combo for combo in all_combos() if combo in HELD_OUT]


# --- rendering --------------------------------------------------------------------------------------


def render(
    attributes: Attributes, *, rng: np.random.Generator | None = None, as_image: bool = False
) -> np.ndarray | Image.Image:
    """Draw ``attributes`` as a 64x64 RGB image.

    Args:
        attributes: what to draw.
        rng: draws the half extent within the size's range and a jitter of the position of up to
            ``POSITION_JITTER`` pixels; ``None`` draws the canonical image (middle extent, no jitter).
        as_image: return a ``PIL.Image.Image`` instead of an array.

    Returns:
        uint8 array of shape [64, 64, 3] (height, width, RGB), or a PIL image.
    """
    low, high = SIZE_HALF_EXTENT[attributes.size]
    anchor_x, anchor_y = POSITION_ANCHORS[attributes.position]
    if rng is None:
        half, dx, dy = (low + high) // 2, 0, 0
    else:
        half = int(rng.integers(low, high + 1))
        dx, dy = (int(v) for v in rng.integers(-POSITION_JITTER, POSITION_JITTER + 1, size=2))
    cx, cy = anchor_x + dx, anchor_y + dy
    box = (cx - half, cy - half, cx + half - 1, cy + half - 1)  # inclusive corners, side 2 * half

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[attributes.background])
    draw = ImageDraw.Draw(image)
    fill = COLOURS[attributes.colour]
    if attributes.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif attributes.shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # an upright isosceles triangle filling the box
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)
    return image if as_image else np.asarray(image, dtype=np.uint8).copy()


# --- captions ---------------------------------------------------------------------------------------

SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "on the top"),
    "bottom": ("at the bottom", "on the bottom"),
    "centre": ("in the centre", "in the center", "in the middle"),
}
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("left",),
    "right": ("right",),
    "top": ("top",),
    "bottom": ("bottom",),
    "centre": ("centre", "center", "middle"),
}
# Each template names shape, colour, size and position; `{bg}` templates also name the background.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} {where}",
    "{pos}: {size} {colour} {shape}",
    "{size} {colour} {shape} {where}",
    "a {colour} {shape}, {size}, {where}",
    "a {size} {colour} {shape} {where} on a {bg} background",
    "{pos}: {size} {colour} {shape} on {bg}",
    "{size} {colour} {shape}, {where}, {bg} background",
    "a {bg} background with a {size} {colour} {shape} {where}",
)
BACKGROUND_TEMPLATES = tuple(t for t in CAPTION_TEMPLATES if "{bg}" in t)


def caption(attributes: Attributes, *, rng: np.random.Generator | None = None, template: int | None = None) -> str:
    """Describe ``attributes`` in words.

    ``template`` picks one of :data:`CAPTION_TEMPLATES` by index; otherwise ``rng`` picks one, and the
    synonyms. With neither, the first template and first synonyms are used.
    """

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))] if rng is not None else options[0]

    if template is None:
        template = int(rng.integers(len(CAPTION_TEMPLATES))) if rng is not None else 0
    return CAPTION_TEMPLATES[template].format(
        size=pick(SIZE_WORDS[attributes.size]),
        colour=attributes.colour,
        shape=attributes.shape,
        where=pick(POSITION_PHRASES[attributes.position]),
        pos=pick(POSITION_WORDS[attributes.position]),
        bg=attributes.background,
    )


def mentions_background(text: str) -> bool:
    """Whether a caption names the background (background names never appear otherwise)."""
    words = text.replace(",", " ").replace(":", " ").split()
    return any(name in words for name in BACKGROUNDS)


# --- sampling ---------------------------------------------------------------------------------------


def sample_attributes(rng: np.random.Generator, *, split: Split = "train") -> Attributes:
    """Draw attributes uniformly; ``split`` restricts the (colour, shape, position) combination.

    ``"train"`` never returns a :data:`HELD_OUT` combination, ``"held_out"`` only returns those, ``"all"``
    returns any.
    """
    if split == "held_out":
        colour, shape, position = held_out_combos()[int(rng.integers(len(HELD_OUT)))]
    elif split in ("train", "all"):
        while True:
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            position = POSITIONS[int(rng.integers(len(POSITIONS)))]
            if split == "all" or (colour, shape, position) not in HELD_OUT:
                break
    else:
        raise ValueError(f"sample_attributes: got split={split!r}, expected 'train', 'held_out' or 'all'.")
    size = SIZES[int(rng.integers(len(SIZES)))]
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return Attributes(shape=shape, colour=colour, size=size, position=position, background=background)


def sample(rng: np.random.Generator, *, split: Split = "train") -> tuple[Attributes, str]:
    """Draw one (attributes, caption) pair from ``rng``; see :func:`sample_attributes` for ``split``."""
    attributes = sample_attributes(rng, split=split)
    return attributes, caption(attributes, rng=rng)


def make_dataset(
    count: int, *, seed: int = 0, split: Split = "train"
) -> tuple[np.ndarray, list[str], list[Attributes]]:
    """Generate ``count`` examples deterministically from ``seed``.

    Returns:
        images: uint8 array [count, 64, 64, 3]; captions: list of ``count`` strings;
        attributes: list of ``count`` :class:`Attributes`.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions: list[str] = []
    attributes: list[Attributes] = []
    for i in range(count):
        attrs, text = sample(rng, split=split)
        images[i] = render(attrs, rng=rng)
        captions.append(text)
        attributes.append(attrs)
    return images, captions, attributes

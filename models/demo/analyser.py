"""A deterministic analyser of demo images: it reads back the attributes that :mod:`.dataset` draws.

Pure numpy, no learned model, so it can judge generated images without bias towards any model::

    >>> from latentrt.models.demo import analyser, dataset
    >>> attrs = dataset.Attributes("circle", "red", "large", "left", "navy")
    >>> analyser.analyse(dataset.render(attrs))
    {'shape': 'circle', 'colour': 'red', 'size': 'large', 'position': 'left', 'background': 'navy'}

The steps:

1. background: the median colour of the 2-pixel image border, snapped to the nearest named background;
2. foreground: pixels far from the background colour (adaptive threshold), largest 4-connected component;
3. colour: median foreground colour, nearest named colour;
4. size: the longer side of the foreground's bounding box (small shapes are at most 14 pixels, large ones at
   least 22);
5. position: the bounding-box centre, nearest position anchor;
6. shape: the fill ratio area / bounding-box area (square ~1.0, circle ~0.79, triangle ~0.5).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

import numpy as np
from PIL import Image

from . import dataset

# Longer bounding-box side, in pixels, from which a shape counts as large (small <= 14, large >= 22).
LARGE_EXTENT = 18
# Fill ratio thresholds: below TRIANGLE_MAX a triangle, above SQUARE_MIN a square, else a circle.
TRIANGLE_MAX_FILL = 0.65
SQUARE_MIN_FILL = 0.89

_COLOUR_NAMES = list(dataset.COLOURS)
_COLOUR_RGB = np.array(list(dataset.COLOURS.values()), dtype=np.float32)
_BACKGROUND_NAMES = list(dataset.BACKGROUNDS)
_BACKGROUND_RGB = np.array(list(dataset.BACKGROUNDS.values()), dtype=np.float32)
_ANCHOR_NAMES = list(dataset.POSITION_ANCHORS)
_ANCHOR_XY = np.array(list(dataset.POSITION_ANCHORS.values()), dtype=np.float32)


def _as_array(image: np.ndarray | Image.Image) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"analyse: got an image of shape {array.shape}, expected [height, width, 3] RGB.")
    if array.dtype != np.uint8:  # floats in [0, 1]
        array = np.clip(np.round(array.astype(np.float32) * 255.0), 0, 255)
    return array.astype(np.float32)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (all False when the mask is empty)."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, label = 0, 0, 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label += 1
        labels[start] = label
        queue, size = deque([start]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label if best_size else np.zeros_like(mask)


def analyse(image: np.ndarray | Image.Image) -> dict[str, str | None]:
    """Read the attributes of one image.

    Args:
        image: uint8 [H, W, 3] RGB array, float [H, W, 3] in [0, 1], or a PIL image (64x64 as drawn by
            :func:`.dataset.render`).

    Returns:
        ``{"shape", "colour", "size", "position", "background"}`` mapped to the predicted names; the four
        shape attributes are ``None`` when no foreground is found.
    """
    pixels = _as_array(image)
    height, width, _ = pixels.shape

    # 1. Background: median of the border, nearest named background.
    border = np.concatenate([part.reshape(-1, 3) for part in (pixels[:2], pixels[-2:], pixels[:, :2], pixels[:, -2:])])
    background_rgb = np.median(border, axis=0)
    background = _BACKGROUND_NAMES[int(np.argmin(np.linalg.norm(_BACKGROUND_RGB - background_rgb, axis=1)))]
    prediction: dict[str, str | None] = dict.fromkeys(dataset.ATTRIBUTE_NAMES)
    prediction["background"] = background

    # 2. Foreground: far from the background (half-way to the most distant pixels), largest component.
    distance = np.linalg.norm(pixels - background_rgb, axis=2)
    threshold = max(40.0, 0.5 * float(np.percentile(distance, 99.5)))
    mask = _largest_component(distance > threshold)
    area = int(mask.sum())
    if area < 4:
        return prediction

    # 3. Colour: median of the foreground.
    colour_rgb = np.median(pixels[mask], axis=0)
    prediction["colour"] = _COLOUR_NAMES[int(np.argmin(np.linalg.norm(_COLOUR_RGB - colour_rgb, axis=1)))]

    # 4-5. Size and position from the bounding box.
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    box_h, box_w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    prediction["size"] = "large" if max(box_h, box_w) >= LARGE_EXTENT else "small"
    centre = np.array([(cols[0] + cols[-1] + 1) / 2, (rows[0] + rows[-1] + 1) / 2], dtype=np.float32)
    centre *= np.array([dataset.IMAGE_SIZE / width, dataset.IMAGE_SIZE / height], dtype=np.float32)
    prediction["position"] = _ANCHOR_NAMES[int(np.argmin(np.linalg.norm(_ANCHOR_XY - centre, axis=1)))]

    # 6. Shape from the fill ratio of the bounding box.
    fill = area / float(box_h * box_w)
    prediction["shape"] = "triangle" if fill < TRIANGLE_MAX_FILL else "square" if fill > SQUARE_MIN_FILL else "circle"
    return prediction


def score(
    pairs: Iterable[tuple[np.ndarray | Image.Image, dataset.Attributes | Mapping[str, str | None]]],
) -> dict[str, float]:
    """Per-attribute accuracy of images against the attributes they should show.

    Args:
        pairs: (image, expected) pairs; ``expected`` is an :class:`.dataset.Attributes` or a mapping from
            attribute names to names, where a missing or ``None`` entry is not scored (for example the
            background of a caption that does not name one).

    Returns:
        ``{"overall", "shape", "colour", "size", "position", "background", "all_correct", "count"}``:
        each attribute's accuracy in [0, 1]; ``overall`` is the mean of the per-attribute accuracies;
        ``all_correct`` is the fraction of images with every scored attribute right; ``count`` the number
        of images. An attribute that no pair scores is left out.
    """
    hits: dict[str, list[bool]] = {name: [] for name in dataset.ATTRIBUTE_NAMES}
    all_correct: list[bool] = []
    for image, expected in pairs:
        wanted = expected.to_dict() if isinstance(expected, dataset.Attributes) else dict(expected)
        predicted = analyse(image)
        right = [predicted[name] == value for name, value in wanted.items() if value is not None]
        for name, value in wanted.items():
            if value is not None:
                hits[name].append(predicted[name] == value)
        all_correct.append(all(right))
    result = {name: float(np.mean(values)) for name, values in hits.items() if values}
    result = {"overall": float(np.mean(list(result.values()))) if result else 0.0, **result}
    result["all_correct"] = float(np.mean(all_correct)) if all_correct else 0.0
    result["count"] = float(len(all_correct))
    return result

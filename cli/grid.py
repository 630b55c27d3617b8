"""A grid of generated images with each prompt written under its image (for `generate --grid`)."""

from __future__ import annotations

import textwrap


def make_grid(images: list, captions: list[str], *, columns: int = 4, cell: int = 192):
    """One PIL image: `images` scaled to `cell` pixels wide in rows of `columns`, captions below."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    line_height = 12
    lines = [textwrap.wrap(c, width=max(8, cell // 6))[:3] for c in captions]
    text_height = 3 * line_height + 6
    scale = cell / images[0].width
    cell_h = round(images[0].height * scale)
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * cell, rows * (cell_h + text_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, text) in enumerate(zip(images, lines)):
        x, y = (i % columns) * cell, (i // columns) * (cell_h + text_height)
        grid.paste(image.resize((cell, cell_h), Image.NEAREST), (x, y))
        for k, line in enumerate(text):
            draw.text((x + 4, y + cell_h + 3 + k * line_height), line, fill="black", font=font)
    return grid

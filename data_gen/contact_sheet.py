"""A contact sheet: one row per persona, its views left to right, its name as the row label."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_HELDOUT = (220, 30, 30)
_MIN_TILE = 96  # Small images are enlarged (by an integer factor, nearest neighbour) to this.


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Old Pillow or no FreeType: the bitmap font.
        return ImageFont.load_default()


def contact_sheet(
    images: Sequence[Sequence[np.ndarray]],
    names: Sequence[str],
    heldout: Sequence[Sequence[bool]] | None = None,
) -> Image.Image:
    """An RGB image: row k shows `images[k]` (uint8 [H, W, 3] arrays) labelled `names[k]`.

    Views flagged in `heldout[k]` get a red frame and an "H" mark; a header explains the mark.
    """
    if len(images) != len(names):
        raise ValueError(f"contact_sheet: {len(images)} rows of images but {len(names)} names")
    if heldout is not None and [len(h) for h in heldout] != [len(r) for r in images]:
        raise ValueError("contact_sheet: heldout flags must match the images row by row")
    if not images or not any(len(row) for row in images):
        raise ValueError("contact_sheet: no images to show")
    first = next(np.asarray(im) for row in images for im in row)
    height, width = first.shape[:2]
    zoom = max(1, -(-_MIN_TILE // max(height, width)))
    tile_h, tile_w = height * zoom, width * zoom
    pad = 4
    font = _font(max(11, min(18, tile_h // 6)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    label_w = max(text_size(n)[0] for n in names) + 3 * pad
    header = "views left to right" + ("; red frame = held out" if heldout is not None else "")
    header_h = text_size(header)[1] + 3 * pad
    columns = max(len(row) for row in images)
    sheet_w = max(label_w + columns * (tile_w + pad) + pad, text_size(header)[0] + 2 * pad)
    sheet_h = header_h + len(images) * (tile_h + pad) + pad
    sheet = Image.new("RGB", (sheet_w, sheet_h), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, pad), header, fill=_TEXT, font=font)
    for k, (row, name) in enumerate(zip(images, names)):
        y = header_h + k * (tile_h + pad)
        _, name_h = text_size(name)
        draw.text((pad, y + (tile_h - name_h) // 2), name, fill=_TEXT, font=font)
        for v, image in enumerate(row):
            array = np.asarray(image)
            if array.shape != first.shape or array.dtype != np.uint8:
                raise ValueError(f"contact_sheet: image {k},{v} has shape {array.shape} and dtype "
                                 f"{array.dtype}; expected {first.shape} uint8 like the first")
            tile = Image.fromarray(array)
            if zoom > 1:
                tile = tile.resize((tile_w, tile_h), Image.NEAREST)
            x = label_w + v * (tile_w + pad)
            sheet.paste(tile, (x, y))
            if heldout is not None and heldout[k][v]:
                frame = max(2, tile_w // 40)
                draw.rectangle((x, y, x + tile_w - 1, y + tile_h - 1), outline=_HELDOUT,
                               width=frame)
                draw.text((x + frame + 2, y + frame), "H", fill=_HELDOUT, font=font)
    return sheet

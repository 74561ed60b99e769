"""Small PIL drawing helpers shared by the environments: fonts, playing cards and text.

The ``draw_*`` helpers draw onto a :class:`PIL.ImageDraw.ImageDraw` and return nothing, so an
environment's ``_image()`` stays a short list of draw calls. Fonts come from :func:`PIL.ImageFont.load_default`, which
ships inside Pillow: no font file has to exist on the machine, so frames are identical everywhere. That
font has no playing-card suit glyphs, so suits are drawn as shapes.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Box = tuple[int, int, int, int]
Color = tuple[int, int, int]

#: The card-table green of RL4VLM's gym-cards frames (#35654d).
TABLE_GREEN: Color = (53, 101, 77)
WHITE: Color = (255, 255, 255)
BLACK: Color = (20, 20, 20)
RED: Color = (200, 30, 30)
CARD_BACK_BLUE: Color = (40, 70, 160)
GREY: Color = (150, 150, 150)

#: Rank labels indexed by rank - 1: ranks 1..13 are A, 2..10, J, Q, K.
RANK_LABELS: tuple[str, ...] = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")
#: Suit names indexed by ``suit_index``; hearts and diamonds are red.
SUIT_NAMES: tuple[str, ...] = ("spades", "hearts", "diamonds", "clubs")

# Below this size the default font's digits blur into each other on a 128-pixel frame.
_MIN_FONT_SIZE = 6


@functools.cache
def load_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at ``size`` pixels, cached so that drawing a frame loads nothing.

    Args:
        size: Font size in pixels (at least 1).

    Returns:
        A font for :meth:`PIL.ImageDraw.ImageDraw.text`.
    """
    if size < 1:
        raise ValueError(f"Font size must be a positive number of pixels, got {size}.")
    return ImageFont.load_default(size=size)


def rank_label(rank: int) -> str:
    """The label of a card rank: 1 is ``"A"``, 11..13 are ``"J"``, ``"Q"``, ``"K"``.

    >>> [rank_label(rank) for rank in (1, 7, 10, 13)]
    ['A', '7', '10', 'K']
    """
    if not 1 <= rank <= 13:
        raise ValueError(f"A card rank is 1 (ace) to 13 (king), got {rank}.")
    return RANK_LABELS[rank - 1]


def new_canvas(width: int, height: int, color: Color = TABLE_GREEN) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A blank RGB image and a drawing context on it."""
    image = Image.new("RGB", (width, height), color)
    return image, ImageDraw.Draw(image)


def to_array(image: Image.Image) -> np.ndarray:
    """The image as a fresh uint8 (H, W, 3) array, the observation format."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def stroke_width(size: int) -> int:
    """Outline width that makes the thin built-in font read as bold at ``size`` px (0 below 18 px).

    >>> stroke_width(12), stroke_width(36)
    (0, 2)
    """
    return size // 18


def text_size(text: str, size: int) -> tuple[int, int]:
    """Width and height in pixels of ``text`` in the built-in font at ``size``, outline included."""
    left, top, right, bottom = load_font(size).getbbox(text, stroke_width=stroke_width(size))
    return right - left, bottom - top


@functools.lru_cache(maxsize=4096)
def fit_font_size(text: str, max_width: int, max_height: int, largest: int = 64) -> int:
    """The largest font size, at most ``largest``, at which ``text`` fits in ``max_width`` x ``max_height``.

    Cached: a frame asks the same few questions every step, and measuring text is most of drawing it.
    """
    low, high = _MIN_FONT_SIZE, max(largest, _MIN_FONT_SIZE)
    while low < high:  # binary search: the text only grows with the font size
        middle = (low + high + 1) // 2
        width, height = text_size(text, middle)
        if width <= max_width and height <= max_height:
            low = middle
        else:
            high = middle - 1
    return low


def draw_text_centered(draw: ImageDraw.ImageDraw, box: Box, text: str, fill: Color = WHITE, largest: int = 64) -> None:
    """Draw ``text`` as large as fits (up to ``largest`` px), centred in ``box``."""
    x0, y0, x1, y1 = box
    size = fit_font_size(text, x1 - x0, y1 - y0, largest)
    # anchor "mm" centres the ink on the point, so labels with and without descenders line up.
    draw.text(
        ((x0 + x1) / 2, (y0 + y1) / 2),
        text,
        fill=fill,
        font=load_font(size),
        anchor="mm",
        stroke_width=stroke_width(size),
        stroke_fill=fill,
    )


def draw_text_left(draw: ImageDraw.ImageDraw, box: Box, text: str, fill: Color = WHITE, largest: int = 64) -> None:
    """Draw ``text`` as large as fits (up to ``largest`` px), left-aligned and vertically centred in ``box``."""
    x0, y0, x1, y1 = box
    size = fit_font_size(text, x1 - x0, y1 - y0, largest)
    draw.text(
        (x0, (y0 + y1) / 2),
        text,
        fill=fill,
        font=load_font(size),
        anchor="lm",
        stroke_width=stroke_width(size),
        stroke_fill=fill,
    )


@functools.lru_cache(maxsize=1024)
def _condensed_mask(text: str, width: int, height: int) -> Image.Image:
    """``text`` as a greyscale mask at most ``width`` x ``height``, squeezed sideways rather than shrunk."""
    size = fit_font_size(text, 10 * width, height, largest=height)
    text_width, text_height = text_size(text, size)
    canvas = Image.new("L", (text_width, text_height), 0)
    left, top, _, _ = load_font(size).getbbox(text, stroke_width=stroke_width(size))
    ImageDraw.Draw(canvas).text(
        (-left, -top), text, fill=255, font=load_font(size), stroke_width=stroke_width(size), stroke_fill=255
    )
    if text_width <= width:
        return canvas
    return canvas.resize((width, text_height), Image.Resampling.LANCZOS)


def draw_text_condensed(draw: ImageDraw.ImageDraw, box: Box, text: str, fill: Color = WHITE) -> None:
    """Draw ``text`` as tall as ``box`` allows, centred, narrowed to fit its width if it must be.

    Card ranks use this: on a narrow card "10" stays as tall as "4" instead of shrinking to half its
    height, which matters to a vision model reading a 128-pixel frame.
    """
    x0, y0, x1, y1 = box
    mask = _condensed_mask(text, x1 - x0, y1 - y0)
    left = x0 + (x1 - x0 - mask.width) // 2
    top = y0 + (y1 - y0 - mask.height) // 2
    draw.bitmap((left, top), mask, fill=fill)


def draw_banner(
    draw: ImageDraw.ImageDraw,
    box: Box,
    text: str,
    background: Color = BLACK,
    fill: Color = WHITE,
    largest: int = 64,
) -> None:
    """A filled strip with ``text`` centred on it, e.g. a result line across the bottom of a frame."""
    draw.rectangle(box, fill=background)
    x0, y0, x1, y1 = box
    margin = max(1, (y1 - y0) // 8)
    draw_text_centered(draw, (x0 + margin, y0 + margin, x1 - margin, y1 - margin), text, fill, largest)


def draw_suit(draw: ImageDraw.ImageDraw, center: tuple[float, float], size: float, suit_index: int) -> None:
    """Draw a suit symbol of height ``size`` centred on ``center``: 0 spades, 1 hearts, 2 diamonds, 3 clubs."""
    if not 0 <= suit_index < len(SUIT_NAMES):
        raise ValueError(f"suit_index is 0..3 ({', '.join(SUIT_NAMES)}), got {suit_index}.")
    cx, cy = center
    r = size / 2
    color = RED if suit_index in (1, 2) else BLACK
    if suit_index == 2:  # diamond
        draw.polygon([(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)], fill=color)
        return
    lobe = 0.45 * r
    if suit_index == 1:  # heart: two lobes on top, point at the bottom
        for dx in (-lobe, lobe):
            draw.ellipse((cx + dx - lobe, cy - r + 0.1 * r, cx + dx + lobe, cy - r + 0.1 * r + 2 * lobe), fill=color)
        draw.polygon(
            [(cx - 2 * lobe, cy - r + 0.1 * r + lobe), (cx + 2 * lobe, cy - r + 0.1 * r + lobe), (cx, cy + r)],
            fill=color,
        )
        return
    # Spades and clubs stand on a stem.
    draw.polygon([(cx, cy + 0.2 * r), (cx - 0.35 * r, cy + r), (cx + 0.35 * r, cy + r)], fill=color)
    if suit_index == 0:  # spade: point at the top, two lobes below
        for dx in (-lobe, lobe):
            draw.ellipse((cx + dx - lobe, cy - 0.1 * r - lobe, cx + dx + lobe, cy - 0.1 * r + lobe), fill=color)
        draw.polygon([(cx - 2 * lobe, cy - 0.1 * r), (cx + 2 * lobe, cy - 0.1 * r), (cx, cy - r)], fill=color)
    else:  # club: three round leaves
        leaf = 0.42 * r
        for x, y in ((cx, cy - r + leaf), (cx - 1.05 * leaf, cy + 0.05 * r), (cx + 1.05 * leaf, cy + 0.05 * r)):
            draw.ellipse((x - leaf, y - leaf, x + leaf, y + leaf), fill=color)


def draw_card(
    draw: ImageDraw.ImageDraw,
    box: Box,
    rank_label: str,
    suit_index: int,
    face_down: bool = False,
    dimmed: bool = False,
) -> None:
    """Draw one playing card filling ``box``.

    The rank takes the upper two thirds of the card in the largest font that fits, because a small vision
    model must read it at 128 pixels; the suit is a shape in the lower third.

    Args:
        draw: Where to draw.
        box: ``(left, top, right, bottom)`` in pixels.
        rank_label: ``"A"``, ``"2"`` .. ``"10"``, ``"J"``, ``"Q"`` or ``"K"`` (any short text works).
        suit_index: 0 spades, 1 hearts, 2 diamonds, 3 clubs; hearts and diamonds are red.
        face_down: Draw the card's back instead (rank and suit are not shown).
        dimmed: Grey the face out, e.g. for a card already used in a formula.
    """
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    if width < 6 or height < 6:
        # A long hand on a small frame: too small for a face, a plain outline still counts the cards.
        draw.rectangle(box, fill=CARD_BACK_BLUE if face_down else WHITE, outline=BLACK)
        return
    radius = max(1, min(width, height) // 8)
    if face_down:
        draw.rounded_rectangle(box, radius=radius, fill=CARD_BACK_BLUE, outline=WHITE, width=max(1, width // 16))
        inset = max(2, width // 6)
        draw.rounded_rectangle(
            (x0 + inset, y0 + inset, x1 - inset, y1 - inset), radius=radius, outline=WHITE, width=max(1, width // 20)
        )
        return
    face = (225, 225, 225) if dimmed else WHITE
    draw.rounded_rectangle(box, radius=radius, fill=face, outline=BLACK, width=max(1, width // 24))
    ink = GREY if dimmed else (RED if suit_index in (1, 2) else BLACK)
    margin = max(1, width // 12)
    rank_bottom = y0 + (2 * height) // 3
    draw_text_condensed(draw, (x0 + margin, y0 + margin, x1 - margin, rank_bottom), rank_label, ink)
    suit_size = min(width * 0.45, (y1 - rank_bottom) * 0.8)
    if dimmed:
        return
    draw_suit(draw, ((x0 + x1) / 2, (rank_bottom + y1) / 2 - margin / 2), suit_size, suit_index)


def card_row_boxes(count: int, area: Box, aspect: float = 1.4, gap_ratio: float = 0.12) -> list[Box]:
    """Boxes for ``count`` cards side by side, as large as fits in ``area`` and centred in it.

    Args:
        count: Number of cards.
        area: ``(left, top, right, bottom)`` the row must stay inside.
        aspect: Card height / width.
        gap_ratio: Gap between cards as a fraction of the card width.

    >>> card_row_boxes(2, (0, 0, 100, 70))
    [(0, 2, 47, 67), (52, 2, 99, 67)]
    """
    if count < 1:
        raise ValueError(f"card_row_boxes needs at least one card, got {count}.")
    x0, y0, x1, y1 = area
    width_by_height = (y1 - y0) / aspect
    width_by_row = (x1 - x0) / (count + (count - 1) * gap_ratio)
    card_width = int(min(width_by_height, width_by_row))
    card_height = int(card_width * aspect)
    gap = int(card_width * gap_ratio)
    row_width = count * card_width + (count - 1) * gap
    left = x0 + (x1 - x0 - row_width) // 2
    top = y0 + (y1 - y0 - card_height) // 2
    return [
        (left + i * (card_width + gap), top, left + i * (card_width + gap) + card_width, top + card_height)
        for i in range(count)
    ]

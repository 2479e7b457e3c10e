"""Synthetic scenes: small coloured shapes and text signs on a 3x3 grid, rendered with PIL.

A scene is pure data (:class:`Scene`), generated deterministically from an integer seed by
:func:`generate_scene`, and drawn by :func:`render_scene` at any resolution (positions and sizes
are stored relative to the image side). Each grid cell holds at most one item, so every position
question ("top left", "left of") has one unambiguous answer. Objects span about a quarter of the
image side (2-3 patches of a 14-px ViT at 168 px: large enough that a small LLM finds them among the
visual tokens, where one-patch objects were not learnt within a CPU training budget), and sign text
is only a few pixels high, so compressing visual tokens to 10-24 of 144 can really lose the
information a question needs (counts, positions, which object has which colour, the text).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "SHAPES",
    "SHAPE_PLURALS",
    "COLORS",
    "SIGN_COLORS",
    "SIGN_FONT_SCALE",
    "SIGN_WORDS",
    "BACKGROUNDS",
    "GRID_SIZE",
    "SceneObject",
    "Sign",
    "Scene",
    "position_name",
    "POSITION_NAMES",
    "object_prior",
    "generate_scene",
    "render_scene",
    "random_sign_text",
]

GRID_SIZE = 3
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon")
SHAPE_PLURALS: dict[str, str] = {shape: shape + "s" for shape in SHAPES}
# Skewed priors make some (colour, shape) objects frequent, which POPE's "popular" negatives need.
_SHAPE_WEIGHTS: tuple[float, ...] = (0.26, 0.22, 0.18, 0.14, 0.11, 0.09)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "blue": (35, 80, 220),
    "green": (30, 150, 55),
    "yellow": (235, 200, 20),
    "black": (25, 25, 25),
    "orange": (245, 125, 15),
    "purple": (135, 55, 185),
    "pink": (240, 105, 180),
}
_COLOR_WEIGHTS: tuple[float, ...] = (0.20, 0.17, 0.15, 0.13, 0.11, 0.09, 0.08, 0.07)
SIGN_COLORS: tuple[str, ...] = ("red", "blue", "green", "black", "purple")
_SIGN_TEXT_RGB = (255, 255, 255)
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "light gray": (222, 222, 222),
    "beige": (240, 230, 210),
}
_ROW_NAMES = ("top", "middle", "bottom")
_COL_NAMES = ("left", "center", "right")
#: The common words a sign may show (the other half of the signs show random letter/digit strings).
SIGN_WORDS: tuple[str, ...] = (
    "CAT", "DOG", "SUN", "STOP", "OPEN", "BUS", "MILK", "TAXI", "EXIT", "BOOK", "FISH", "TREE",
    "BIRD", "CAKE", "LAMP", "GO", "UP", "ZOO", "MAP", "JAZZ", "KING", "PARK", "SALE", "BANK",
    "CAFE", "HOTEL", "PIZZA", "MUSIC", "TRAIN", "HOUSE", "WATER", "RIVER", "BREAD", "APPLE",
    "LEMON", "SHOP", "MOON", "STAR", "RAIN", "GOLD", "WIND", "ROAD", "GATE", "BOX", "HAT", "PEN",
)
# Letters and digits that are hard to confuse in a small font (no O/0, I/1, Q).
_SIGN_ALPHABET = "ABCDEFGHJKLMNPRSTUVWXYZ2345789"
# Texts the VQA normaliser would rewrite (articles, number words) or that read as yes/no.
_RESERVED_TEXTS = frozenset({
    "a", "an", "the", "no", "yes", "none", "zero", "one", "two", "six", "ten",
})


def position_name(row: int, col: int) -> str:
    """Name of a 3x3 grid cell: ``"top left"``, ``"top"``, ..., ``"center"``, ``"bottom right"``.

    Parameters
    ----------
    row, col : int
        Cell indices in ``[0, 3)``, row 0 at the top, column 0 at the left.

    Returns
    -------
    str
        The position name.
    """
    if not (0 <= row < GRID_SIZE and 0 <= col < GRID_SIZE):
        raise ValueError(f"row and col must be in [0, {GRID_SIZE}), got row={row}, col={col}")
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return _COL_NAMES[col]
    if col == 1:
        return _ROW_NAMES[row]
    return f"{_ROW_NAMES[row]} {_COL_NAMES[col]}"


POSITION_NAMES: tuple[str, ...] = tuple(
    position_name(r, c) for r in range(GRID_SIZE) for c in range(GRID_SIZE)
)


def object_prior(color: str, shape: str) -> float:
    """Probability that one generated object is a ``color`` ``shape`` (the dataset frequency).

    Parameters
    ----------
    color : str
        A key of :data:`COLORS`.
    shape : str
        One of :data:`SHAPES`.

    Returns
    -------
    float
        The product of the colour and shape priors.
    """
    if color not in COLORS or shape not in SHAPES:
        raise ValueError(
            f"unknown object {color!r} {shape!r}; colours: {list(COLORS)}, shapes: {list(SHAPES)}"
        )
    return _COLOR_WEIGHTS[list(COLORS).index(color)] * _SHAPE_WEIGHTS[SHAPES.index(shape)]


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene; ``x``, ``y``, ``size`` are fractions of the image side."""

    shape: str
    color: str
    row: int
    col: int
    x: float
    y: float
    size: float

    @property
    def name(self) -> str:
        """``"<color> <shape>"``, e.g. ``"blue star"``."""
        return f"{self.color} {self.shape}"

    @property
    def position(self) -> str:
        """Grid position name, e.g. ``"top left"``."""
        return position_name(self.row, self.col)


@dataclass(frozen=True)
class Sign:
    """A coloured sign with short white text; ``x``, ``y`` are fractions of the image side."""

    text: str
    color: str
    row: int
    col: int
    x: float
    y: float

    @property
    def position(self) -> str:
        """Grid position name, e.g. ``"center"``."""
        return position_name(self.row, self.col)


@dataclass(frozen=True)
class Scene:
    """Structured ground truth of one synthetic image."""

    seed: int
    background: str
    objects: tuple[SceneObject, ...]
    signs: tuple[Sign, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (inverse of :meth:`from_dict`)."""
        return {
            "seed": self.seed,
            "background": self.background,
            "objects": [asdict(o) for o in self.objects],
            "signs": [asdict(s) for s in self.signs],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scene:
        """Rebuild a scene from :meth:`to_dict` output."""
        return cls(
            seed=int(data["seed"]),
            background=str(data["background"]),
            objects=tuple(SceneObject(**o) for o in data["objects"]),
            signs=tuple(Sign(**s) for s in data["signs"]),
        )

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        """Number of objects matching ``shape`` and/or ``color`` (None matches any)."""
        return sum(
            (shape is None or o.shape == shape) and (color is None or o.color == color)
            for o in self.objects
        )

    def describe(self) -> str:
        """Full English description, items in reading order (row by row, left to right)."""
        shapes = len(self.objects)
        parts = [f"An image with {shapes} shape{'s' if shapes != 1 else ''}"]
        if self.signs:
            parts[0] += f" and {len(self.signs)} sign{'s' if len(self.signs) != 1 else ''}"
        parts[0] += f" on a {self.background} background."
        items: list[tuple[int, int, str]] = [
            (o.row, o.col, f"{_with_article(o.name)}") for o in self.objects
        ]
        items += [
            (s.row, s.col, f'{_with_article(s.color)} sign that reads "{s.text}"')
            for s in self.signs
        ]
        for row, col, text in sorted(items):
            where = position_name(row, col)
            if where == "center":
                where = "In the center"
            elif where in ("left", "right"):
                where = f"On the {where}"
            else:
                where = f"At the {where}"
            parts.append(f"{where} there is {text}.")
        return " ".join(parts)


def _with_article(noun_phrase: str) -> str:
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase


def random_sign_text(rng: random.Random) -> str:
    """A 2-5 character sign text: a common short word or a random letter/digit string.

    Parameters
    ----------
    rng : random.Random
        Source of randomness.

    Returns
    -------
    str
        Upper-case text that VQA normalisation leaves unchanged apart from lower-casing.
    """
    while True:
        if rng.random() < 0.5:
            text = rng.choice(SIGN_WORDS)
        else:
            text = "".join(rng.choice(_SIGN_ALPHABET) for _ in range(rng.randint(2, 5)))
        if text.lower() not in _RESERVED_TEXTS:
            return text


def generate_scene(
    seed: int,
    *,
    min_objects: int = 2,
    max_objects: int = 8,
    sign_count_weights: Sequence[float] = (0.5, 0.35, 0.15),
) -> Scene:
    """Generate a scene deterministically from ``seed``.

    Parameters
    ----------
    seed : int
        Non-negative seed; the same seed always gives the same scene.
    min_objects, max_objects : int
        Range of the number of shapes, within ``[1, 9]``.
    sign_count_weights : Sequence[float]
        Relative probabilities of 0, 1, 2, ... signs. Shapes and signs share the 9 grid cells, so
        the sign count is reduced when cells run out.

    Returns
    -------
    Scene
        The scene ground truth.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    cells = GRID_SIZE * GRID_SIZE
    if not 1 <= min_objects <= max_objects <= cells:
        raise ValueError(
            f"need 1 <= min_objects <= max_objects <= {cells}, got {min_objects}, {max_objects}"
        )
    if not sign_count_weights or any(w < 0 for w in sign_count_weights) \
            or sum(sign_count_weights) <= 0 or len(sign_count_weights) > len(SIGN_COLORS) + 1:
        raise ValueError(
            "sign_count_weights must be 1 to "
            f"{len(SIGN_COLORS) + 1} non-negative weights with a positive sum, "
            f"got {sign_count_weights!r}"
        )
    rng = random.Random(seed)
    n_objects = rng.randint(min_objects, max_objects)
    n_signs = rng.choices(range(len(sign_count_weights)), weights=sign_count_weights)[0]
    n_signs = min(n_signs, cells - n_objects)
    chosen_cells = rng.sample(range(cells), n_objects + n_signs)
    cell_side = 1.0 / GRID_SIZE
    objects = []
    for cell in chosen_cells[:n_objects]:
        row, col = divmod(cell, GRID_SIZE)
        # Objects 0.20-0.26 of the side: 2-3 patches wide at 168 px (see the module docstring).
        size = rng.uniform(0.20, 0.26)
        # Jitter keeps the whole shape (plus a margin) inside its cell.
        slack = (cell_side - size) / 2 - 0.02
        objects.append(SceneObject(
            shape=rng.choices(SHAPES, weights=_SHAPE_WEIGHTS)[0],
            color=rng.choices(list(COLORS), weights=_COLOR_WEIGHTS)[0],
            row=row, col=col,
            x=round((col + 0.5) * cell_side + rng.uniform(-slack, slack), 4),
            y=round((row + 0.5) * cell_side + rng.uniform(-slack, slack), 4),
            size=round(size, 4),
        ))
    sign_colors = rng.sample(SIGN_COLORS, n_signs)
    texts: list[str] = []
    while len(texts) < n_signs:
        text = random_sign_text(rng)
        if text not in texts:
            texts.append(text)
    signs = []
    for cell, color, text in zip(chosen_cells[n_objects:], sign_colors, texts, strict=True):
        row, col = divmod(cell, GRID_SIZE)
        signs.append(Sign(
            text=text, color=color, row=row, col=col,
            x=round((col + 0.5) * cell_side + rng.uniform(-0.01, 0.01), 4),
            y=round((row + 0.5) * cell_side + rng.uniform(-0.04, 0.04), 4),
        ))
    background = rng.choice(list(BACKGROUNDS))
    return Scene(seed=seed, background=background, objects=tuple(objects), signs=tuple(signs))


@functools.lru_cache(maxsize=64)
def _font(size_px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size_px)


def _regular_polygon(
    cx: float, cy: float, radius: float, corners: int, start_deg: float
) -> list[tuple[float, float]]:
    return [
        (cx + radius * math.cos(math.radians(start_deg + 360.0 * k / corners)),
         cy + radius * math.sin(math.radians(start_deg + 360.0 * k / corners)))
        for k in range(corners)
    ]


def _star(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    outer = _regular_polygon(cx, cy, radius, 5, -90.0)
    inner = _regular_polygon(cx, cy, radius * 0.45, 5, -90.0 + 36.0)
    return [point for pair in zip(outer, inner, strict=True) for point in pair]


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int) -> None:
    cx, cy, radius = obj.x * side, obj.y * side, obj.size * side / 2
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif obj.shape == "square":
        half = radius * 0.85
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy + radius * 0.15, radius * 1.1, 3, -90.0), fill=fill)
    elif obj.shape == "star":
        draw.polygon(_star(cx, cy, radius * 1.1), fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - radius), (cx + radius * 0.7, cy), (cx, cy + radius),
                      (cx - radius * 0.7, cy)], fill=fill)
    elif obj.shape == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, radius, 6, 0.0), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; valid: {list(SHAPES)}")


#: Sign font size as a share of the image side (14 px at 168 px), before shrinking to fit the cell.
SIGN_FONT_SCALE = 0.085


def _draw_sign(draw: ImageDraw.ImageDraw, sign: Sign, side: int) -> None:
    cx, cy = sign.x * side, sign.y * side
    padding = max(2, round(side * 0.015))
    max_text_width = side / GRID_SIZE - 2 * padding - 2
    # Largest font (up to SIGN_FONT_SCALE of the side) whose text fits the cell width.
    font_px = max(8, round(side * SIGN_FONT_SCALE))
    font = _font(font_px)
    while font_px > 8 and draw.textlength(sign.text, font=font) > max_text_width:
        font_px -= 1
        font = _font(font_px)
    left, top, right, bottom = draw.textbbox((cx, cy), sign.text, font=font, anchor="mm")
    draw.rectangle((left - padding, top - padding, right + padding, bottom + padding),
                   fill=COLORS[sign.color])
    draw.text((cx, cy), sign.text, font=font, anchor="mm", fill=_SIGN_TEXT_RGB)


def render_scene(scene: Scene, image_size: int = 168) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``image_size`` x ``image_size`` pixels.

    Parameters
    ----------
    scene : Scene
        The scene to draw.
    image_size : int
        Side in pixels, at least 64 (below that sign text is unreadable). Sign text is drawn at
        :data:`SIGN_FONT_SCALE` of the side, smaller when it is too wide for its cell.

    Returns
    -------
    PIL.Image.Image
        RGB image, shape ``(image_size, image_size, 3)`` as an array.
    """
    if not isinstance(image_size, int) or image_size < 64:
        raise ValueError(f"image_size must be an int >= 64, got {image_size!r}")
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"unknown background {scene.background!r}; valid: {list(BACKGROUNDS)}")
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, image_size)
    for sign in scene.signs:
        _draw_sign(draw, sign, image_size)
    return image

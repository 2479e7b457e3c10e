"""Functions the tiny local lmms-eval tasks of tests/test_lmms_eval_plugin.py name with ``!function``.

Each record carries the colour of its image, so no image file is needed: a 32 x 32 black picture with a 16 x 16
square of that colour in the middle (the size of the tiny test LLaVA's images).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

IMAGE_SIZE = 32


def square_image(color: list[int]) -> Image.Image:
    """A black ``IMAGE_SIZE`` px RGB image with a centred square of ``color`` (three values in [0, 255])."""
    pixels = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    quarter = IMAGE_SIZE // 4
    pixels[quarter:3 * quarter, quarter:3 * quarter] = color
    return Image.fromarray(pixels)


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [square_image(doc["color"])]

"""Procedural coloured-shape images: the training data of the tiny tokenizer and the quickstart.

A sample is one filled shape (circle, square or triangle) of a named colour on a plain background
of another colour, at a random position and scale; its caption names both ("a red circle on a
white background"). The same generator serves the tokenizer tests and the embedded quickstart, so
the tiny tokenizer is trained on the distribution the quickstart later tokenizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
}


@dataclass(frozen=True)
class ShapeSample:
    """One generated image and what it shows."""

    image: Image.Image
    shape: str
    colour: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def make_shape_image(
    shape: str,
    colour: str,
    *,
    size: int,
    rng: np.random.Generator,
    background: str | None = None,
) -> Image.Image:
    """An RGB ``size`` x ``size`` image of one filled ``shape`` in ``colour``.

    The shape's extent is 40-70% of the side, its centre keeps it fully inside the image;
    ``background`` defaults to a random entry of ``BACKGROUNDS``.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; choose from {sorted(COLOURS)}")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    if background is None:
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; choose from {sorted(BACKGROUNDS)}")
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    extent = float(rng.uniform(0.4, 0.7)) * size
    half = extent / 2
    cx = float(rng.uniform(half, size - half))
    cy = float(rng.uniform(half, size - half))
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    else:  # upward triangle inscribed in the same box
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return img


def random_shape_sample(*, size: int, rng: np.random.Generator) -> ShapeSample:
    """A uniformly random shape, colour and background."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    img = make_shape_image(shape, colour, size=size, rng=rng, background=background)
    return ShapeSample(image=img, shape=shape, colour=colour, background=background)


def shape_samples(n: int, *, size: int, seed: int) -> list[ShapeSample]:
    """``n`` samples from a generator seeded with ``seed`` (same seed, same samples)."""
    rng = np.random.default_rng(seed)
    return [random_shape_sample(size=size, rng=rng) for _ in range(n)]


__all__ = [
    "SHAPES",
    "COLOURS",
    "BACKGROUNDS",
    "ShapeSample",
    "make_shape_image",
    "random_shape_sample",
    "shape_samples",
]

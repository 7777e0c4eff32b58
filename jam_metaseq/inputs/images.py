"""Class 2, images (issue 27 §2): a PNG or JPEG header may claim 20000 x 20000 pixels.

``load_image`` reads the header, refuses more than ``MAX_IMAGE_PIXELS`` pixels before any pixel is
decoded, and turns every way PIL fails on a file into one ``InputError`` naming it.
"""

from __future__ import annotations

import os

from .refusal import InputError

MAX_IMAGE_PIXELS = 8192 * 8192
"""Bound on the pixels of an input image (64 megapixels, 192 MiB as RGB); the VQ tokenizers read
256-512 pixel sides."""


def load_image(path: str | os.PathLike, *, modes: tuple[str, ...] = ("RGB",), max_pixels: int = MAX_IMAGE_PIXELS,
               where: str | None = None):
    """An image file decoded to a ``PIL.Image`` (kept in its mode when it is one of ``modes``, else
    converted to ``modes[0]``; the file is closed), its size checked from the header first.

    ``InputError`` (reason ``image_missing``, ``image_unreadable`` or ``image_too_large``) naming the
    file, for a missing file, a file PIL cannot read and a header claiming more than ``max_pixels``
    pixels (checked before any pixel is decoded; PIL's own ``DecompressionBombError`` is caught too)."""
    from PIL import Image

    shown = where or str(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise InputError(f"image of {w}x{h} pixels, more than the {max_pixels} accepted",
                                 reason="image_too_large", where=shown)
            im.load()
            return im.copy() if im.mode in modes else im.convert(modes[0])
    except FileNotFoundError:
        raise InputError("image file not found", reason="image_missing", where=shown) from None
    except Image.DecompressionBombError as e:
        raise InputError(f"image too large ({e})", reason="image_too_large", where=shown) from None
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises all three on corrupt files
        raise InputError(f"cannot read image ({e})", reason="image_unreadable", where=shown) from None


def load_rgb_image(path: str | os.PathLike, *, max_pixels: int = MAX_IMAGE_PIXELS, where: str | None = None):
    """``load_image`` converted to RGB."""
    return load_image(path, modes=("RGB",), max_pixels=max_pixels, where=where)

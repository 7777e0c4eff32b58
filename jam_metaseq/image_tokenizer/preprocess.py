"""Pixels <-> tokenizer tensors: RGBA whitening, resize + centre crop, [-1, 1] scaling, PNG output.

The tokenizer sees square ``resolution`` x ``resolution`` RGB images scaled to [-1, 1] (taming /
Chameleon convention). Preprocessing follows Chameleon's reference tokenizer: transparent pixels
are blended onto white, the shorter side is resized to the target (Lanczos), the centre square is
cropped. Postprocessing clamps to [-1, 1] and rounds to uint8, so ``tensor_to_pil(pil_to_tensor(im))``
returns ``im`` exactly for an RGB image of the target size.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def whiten_transparency(img: Image.Image) -> Image.Image:
    """RGB image; pixels with alpha < 255 are alpha-blended onto white."""
    if img.mode == "RGB":
        return img
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)  # (H, W, 4)
    alpha = rgba[..., 3:4] / 255.0
    if (alpha >= 1.0).all():
        return img.convert("RGB")
    rgb = (1.0 - alpha) * 255.0 + alpha * rgba[..., :3]
    return Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side is ``size`` (aspect kept), then crop the centre square."""
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        new = (max(size, round(w * scale)), max(size, round(h * scale)))
        img = img.resize(new, Image.LANCZOS)
        x0 = (img.width - size) // 2
        y0 = (img.height - size) // 2
        img = img.crop((x0, y0, x0 + size, y0 + size))
    return img


def pil_to_tensor(img: Image.Image, *, size: int) -> torch.Tensor:
    """Any PIL image -> (3, size, size) float32 in [-1, 1]."""
    img = resize_center_crop(whiten_transparency(img), size)
    arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]
    return torch.from_numpy(arr * 2.0 - 1.0).permute(2, 0, 1).contiguous()


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) float, ~[-1, 1] -> RGB PIL image (clamped, rounded to uint8)."""
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got {tuple(x.shape)}")
    u8 = ((x.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(u8.permute(1, 2, 0).numpy(), "RGB")


__all__ = ["whiten_transparency", "resize_center_crop", "pil_to_tensor", "tensor_to_pil"]

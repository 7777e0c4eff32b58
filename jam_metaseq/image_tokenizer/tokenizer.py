"""``ImageTokenizer``: PIL images <-> VQ code grids, the face the data pipeline and generator use.

Paper §3.1: each 256x256 image becomes 32x32 = 1024 codes of an 8192-entry codebook; generation
turns 1024 sampled codes back into a picture. This wraps a ``VQGAN`` with the preprocessing of
``preprocess.py`` and batching; ``encode``/``decode`` are the tensor-level calls.
Codes are codebook indices in [0, n_codes); ``VocabManifest.image_id`` shifts them into the
joint vocabulary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from jam_metaseq.inputs import load_image

from . import checkpoint as ckpt_io
from .config import VQGANConfig
from .model import VQGAN
from .preprocess import pil_to_tensor, tensor_to_pil


class ImageTokenizer:
    """A VQGAN tokenizer on one device, in eval mode."""

    def __init__(self, model: VQGAN, *, device: str | torch.device = "cpu", batch_size: int = 16) -> None:
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.dtype = next(model.parameters()).dtype

    # ---- facts ---------------------------------------------------------------------------
    @property
    def config(self) -> VQGANConfig:
        return self.model.config

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) codes per image."""
        return self.config.grid

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_codes(self) -> int:
        return self.config.n_codes

    @property
    def resolution(self) -> int:
        """Side in pixels of the images the tokenizer reads and writes."""
        return self.config.resolution

    # ---- tensor level --------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [-1, 1] -> (B, h, w) int64 codes (on the tokenizer's device)."""
        return self.model.encode(images.to(self.device, self.dtype))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, h, w) int codes -> (B, 3, R, R) float images, clamped to [-1, 1]."""
        codes = torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes)
        return self.model.decode(codes.to(self.device).long()).clamp(-1.0, 1.0)

    # ---- PIL level -----------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images of any size/mode -> (N, 3, R, R) in [-1, 1] (whiten, resize, centre crop)."""
        if len(images) == 0:
            return torch.zeros(0, 3, self.resolution, self.resolution)
        return torch.stack([pil_to_tensor(im, size=self.resolution) for im in images])

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> (N, h, w) int64 codes in [0, n_codes)."""
        h, w = self.grid
        out = np.zeros((len(images), h, w), dtype=np.int64)
        for start in range(0, len(images), self.batch_size):
            batch = self.preprocess(images[start : start + self.batch_size])
            out[start : start + len(batch)] = self.encode(batch).cpu().numpy()
        return out

    def encode_files(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """Image files -> (N, h, w) int64 codes; a file PIL cannot read raises naming it."""
        h, w = self.grid
        out = np.zeros((len(paths), h, w), dtype=np.int64)
        for start in range(0, len(paths), self.batch_size):
            batch = [open_image(p) for p in paths[start : start + self.batch_size]]
            out[start : start + len(batch)] = self.encode_images(batch)
        return out

    def decode_codes(self, codes: np.ndarray | torch.Tensor) -> list[Image.Image]:
        """(N, h, w) codes (or (N, h*w) flat) -> N RGB PIL images of side R."""
        codes = torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes)
        h, w = self.grid
        if codes.dim() == 2 and codes.shape[1] == h * w:
            codes = codes.reshape(-1, h, w)
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (h, w):
            raise ValueError(f"expected codes of shape (N, {h}, {w}) or (N, {h * w}), got {tuple(codes.shape)}")
        images: list[Image.Image] = []
        for start in range(0, codes.shape[0], self.batch_size):
            for x in self.decode(codes[start : start + self.batch_size]):
                images.append(tensor_to_pil(x))
        return images

    # ---- persistence ---------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None) -> Path:
        """Write ``out_dir/vqgan.ckpt`` + ``out_dir/vqgan.yaml`` (taming layout)."""
        return ckpt_io.save_dir(self.model, out_dir, metadata=metadata)


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully (so the file handle closes) or raise naming the file; its pixel
    count is bounded from the header before decoding (``jam_metaseq.inputs.load_image``)."""
    return load_image(path, modes=("RGB", "RGBA", "LA", "L", "P"))


def load_image_tokenizer(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    trust_pickle: bool = False,
    batch_size: int = 16,
) -> ImageTokenizer:
    """Load a tokenizer from a taming-layout ``vqgan.ckpt`` + ``vqgan.yaml`` pair.

    ``path``: a directory holding both (what ``train_tiny_tokenizer`` writes), the ``.ckpt``
    (YAML of the same stem or ``vqgan.yaml`` beside it) or the ``.yaml``. Local files only.
    """
    ckpt_path, yaml_path = ckpt_io.resolve_paths(path)
    model = ckpt_io.load_vqgan(ckpt_path, yaml_path, trust_pickle=trust_pickle)
    return ImageTokenizer(model, device=device, batch_size=batch_size)


__all__ = ["ImageTokenizer", "load_image_tokenizer", "open_image"]

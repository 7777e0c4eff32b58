"""VQGAN-family image tokenizer: images <-> 32x32 code grids (paper §3.1 Tokenizers).

Public API:
- ``load_image_tokenizer(path, *, device="cpu")`` -> ``ImageTokenizer`` (taming-layout
  ``vqgan.ckpt`` + ``vqgan.yaml``, a directory holding both, or one of the two files).
- ``ImageTokenizer.encode_images(list[PIL]) -> (N, h, w) int64``; ``decode_codes(codes) -> list[PIL]``;
  ``.grid``, ``.n_codes``; tensor-level ``encode`` / ``decode``.
- ``train_tiny_tokenizer(images, *, out_path, steps, seed, ...)``: small CPU-trainable tokenizer.
- ``make_shape_image(shape, colour, *, size, rng)``: the procedural images tests and quickstart share.
- ``VQGANConfig`` + ``PRESETS`` (``make_a_scene_256``, ``chameleon_512``, ``tiny``).
"""

from .checkpoint import CheckpointMismatchError, load_vqgan, read_config, save_taming_checkpoint
from .config import PRESETS, VQGANConfig, preset
from .model import VQGAN
from .synthetic import COLOURS, SHAPES, ShapeSample, make_shape_image, random_shape_sample, shape_samples
from .tokenizer import ImageTokenizer, load_image_tokenizer
from .train import TrainConfig, train_tiny_tokenizer

__all__ = [
    "CheckpointMismatchError",
    "COLOURS",
    "ImageTokenizer",
    "PRESETS",
    "SHAPES",
    "ShapeSample",
    "TrainConfig",
    "VQGAN",
    "VQGANConfig",
    "load_image_tokenizer",
    "load_vqgan",
    "make_shape_image",
    "preset",
    "random_shape_sample",
    "read_config",
    "save_taming_checkpoint",
    "shape_samples",
    "train_tiny_tokenizer",
]

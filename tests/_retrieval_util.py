"""Fixtures for the retrieval tests: clustered unit vectors, a tiny CLIP encoder, JSONL documents."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np


def clustered_unit_vectors(n: int, d: int, *, clusters: int, spread: float, seed: int) -> np.ndarray:
    """(n, d) float32 L2-normalised points around ``clusters`` random centres (like CLIP banks)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def tiny_encoder():
    """One random-weight ``jam-tiny-clip`` encoder per test process (``init_seed`` 0: reproducible)."""
    from jam_metaseq.retrieval.encoders import TINY_CLIP_NAME, ClipDocumentEncoder, ClipEncoderConfig

    return ClipDocumentEncoder(config=ClipEncoderConfig(model_name=TINY_CLIP_NAME, batch_size=4))


def write_docs(folder: Path, n: int, *, seed: int = 0, name: str = "docs.jsonl") -> Path:
    """``n`` caption + image documents (distinct noise PNGs, distinct captions) as JSONL."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    words = ["red", "blue", "cat", "dog", "tree", "car", "house", "river", "sky", "boat", "bird", "hill"]
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        img = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"img{i}.png")
        caption = " ".join(rng.choice(words, size=5)) + f" number {i}"
        if i % 3 == 2:  # some one-modality documents
            segs = [{"text": caption}]
        else:
            segs = [{"text": caption}, {"image": f"img{i}.png"}]
        lines.append(json.dumps({"id": f"doc{i}", "segments": segs}))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


class GreyGridTokenizer:
    """A deterministic stand-in image tokenizer: (h, w) grid of grey levels as codes.

    Has the data pipeline's interface ``encode_images(list[PIL]) -> (N, h, w) int64``.
    """

    def __init__(self, *, grid: tuple[int, int], codes: int) -> None:
        self.grid, self.codes = grid, codes

    def encode_images(self, images) -> np.ndarray:
        out = []
        for im in images:
            g = np.asarray(im.convert("L").resize(self.grid[::-1]), dtype=np.int64)  # (h, w)
            out.append(g * self.codes // 256)
        return np.stack(out)

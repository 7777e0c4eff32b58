"""A tiny chat model on disk for the chat, serve and benchmark code: a random decoder whose vocabulary
has conversation tokens, the byte tokenizer, and a random tiny VQ (32 px, 8x8 codes) to draw PNGs
and read uploads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from jam_metaseq.models import build_model, preset
from jam_metaseq.vocab import tiny_manifest


def write_chat_checkpoint(out: Path, *, max_positions: int = 512, seed: int = 0) -> dict[str, Path]:
    """``out/ckpt.pt`` (+ ``vocab.json`` beside it) and ``out/vq``; returns their paths."""
    from jam_metaseq.image_tokenizer import VQGAN, ImageTokenizer
    from jam_metaseq.image_tokenizer import preset as vq_preset

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vq = ImageTokenizer(VQGAN(vq_preset("tiny")))
    vq.save(out / "vq")
    vocab = tiny_manifest(text_size=256, image_codes=vq.n_codes, image_grid=vq.grid, conversation_tokens=True)
    vocab = dataclasses.replace(vocab, text_tokenizer="bytes")  # jam chat/serve find the tokenizer in it
    cfg = preset("tiny", vocab_size=vocab.size, max_positions=max_positions, init_std=0.3)
    torch.save({"model": build_model(cfg).state_dict(), "jam_config": cfg.to_dict()}, out / "ckpt.pt")
    vocab.save(out / "vocab.json")
    return {"checkpoint": out / "ckpt.pt", "vocab": out / "vocab.json", "vq": out / "vq"}

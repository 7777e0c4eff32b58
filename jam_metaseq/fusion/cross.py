"""JAM-Cross initialisation (paper §2.1.3): branch weights copied from their parents, new weights fresh.

- ``decoder.layers_llm.{i}.*`` <- LLM ``decoder.layers.{i}.*``; ``decoder.layers_cm3.{i}.*`` <- image parent.
- ``decoder.embed_positions_{llm,cm3}`` <- each parent's ``decoder.embed_positions``.
- shared ``decoder.embed_tokens`` / ``output_projection``: the LLM's rows, with the image-code rows
  [image_vocab_start, image_vocab_end) taken from the image parent ("text tokens from the LLM input
  embedding, image tokens from the image-text model").
- ``decoder.layer_norm``: the parents' average (one final LayerNorm after the feature projection).
- new parameters (cross blocks, ``feature_projection``): ``paper`` = N(0, init_std) weights, zero
  biases, unit LayerNorms; ``preserve`` additionally zeroes each cross block's ``out_proj`` and ``fc2``
  (the blocks start as identities, so each branch computes exactly its parent) and sets the feature
  projection to [I/2, I/2]. Each new tensor is drawn from a generator seeded by (seed, name), so the
  result does not depend on the order tensors are streamed in.
"""

from __future__ import annotations

import re
import zlib
from typing import Callable

import torch

from ..models.config import CrossConfig

Getter = Callable[[str], torch.Tensor]
_BRANCH = re.compile(r"^decoder\.layers_(llm|cm3)\.(\d+)\.(.+)$")
_XATTN = re.compile(r"^decoder\.x_attn_layers_(llm|cm3)\.(\d+)\.(.+)$")


def tensor_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def fresh_tensor(name: str, shape: tuple[int, ...], *, cfg: CrossConfig, seed: int) -> torch.Tensor:
    """A new parameter of JAM-Cross, initialised per ``cfg.cross_init`` (see module docstring)."""
    if name.endswith("bias"):
        return torch.zeros(shape)
    if "layer_norm" in name:
        return torch.ones(shape)
    if cfg.cross_init == "preserve":
        if name == "decoder.feature_projection.weight":
            E = cfg.parent.embed_dim
            eye = torch.eye(E) / 2
            return torch.cat([eye, eye], dim=1)
        if name.endswith("cross_attn.out_proj.weight") or name.endswith("fc2.weight"):
            return torch.zeros(shape)
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    return torch.randn(shape, generator=g) * cfg.parent.init_std


def cross_tensor(name: str, *, cfg: CrossConfig, llm: Getter, img: Getter, seed: int = 0) -> torch.Tensor:
    """The JAM-Cross tensor ``name`` built from the parents' tensors (fetched lazily by name)."""
    if name == "decoder.version":
        return torch.tensor([3.0])
    if name in ("decoder.embed_tokens.weight", "decoder.output_projection.weight"):
        lo, hi = cfg.image_vocab_start, cfg.image_vocab_end
        if not 0 <= lo < hi <= cfg.vocab_size:
            raise ValueError(
                f"{name}: image_vocab_start/end = {lo}/{hi} must lie in [0, {cfg.vocab_size}] "
                "(set them from the vocab manifest's image range)"
            )
        out = llm("decoder.embed_tokens.weight").to(torch.float32).clone()
        out[lo:hi] = img("decoder.embed_tokens.weight")[lo:hi].to(torch.float32)
        return out
    if name == "decoder.embed_positions_llm.weight":
        return llm("decoder.embed_positions.weight").to(torch.float32).clone()
    if name == "decoder.embed_positions_cm3.weight":
        return img("decoder.embed_positions.weight").to(torch.float32).clone()
    m = _BRANCH.match(name)
    if m:
        branch, i, rest = m.groups()
        src = llm if branch == "llm" else img
        return src(f"decoder.layers.{i}.{rest}").to(torch.float32).clone()
    if name.startswith("decoder.layer_norm."):
        return (llm(name).to(torch.float32) + img(name).to(torch.float32)) / 2
    if _XATTN.match(name) or name == "decoder.feature_projection.weight":
        from . import state_shapes  # late import: the package imports this module

        shape = state_shapes(cfg)[name]
        return fresh_tensor(name, shape, cfg=cfg, seed=seed)
    raise KeyError(f"{name}: not a JAM-Cross tensor")

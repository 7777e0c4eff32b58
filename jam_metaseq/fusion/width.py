"""JAM-Width (paper §2.1.2, Eq. 2-3): a decoder twice as wide, initialised block-wise from both parents.

Every matrix W (out x in) becomes [[W_llm, X_llm], [W_img, X_img]] with X = the same parent's W
(``init="copy"``, Eq. 2) or the parents' average (``init="average"``, Eq. 3). The fused qkv projection is
widened per K/V/Q block so that the new heads are whole (heads 0..H-1 from the LLM, H..2H-1 from the
image model, head dim kept). Token/position embeddings are concatenated on the hidden dim [llm | img];
vectors (biases, affine LayerNorm) are concatenated [llm; img] (per K/V/Q block for the qkv bias).
Llama-family parents need nothing else: their separate q/k/v/o, gate/up/down and untied head are
plain matrices (so grouped k/v heads double with the query heads, whole, and each head keeps its
rotary layout) and their RMSNorm weights vectors (docs/ARCHITECTURE.md, "JAM-Width for the Llama
family"). Chameleon's per-head q/k norms (heads, D) stack their rows, [llm heads; img heads], as
the widened q/k projections order their heads.

The rule is data: ``widen_blocks`` lists, for one tensor, which block of the widened tensor comes
from which rows of the parents and how (``block_value``). ``widen_tensor`` fills a whole tensor
from that list; ``checkpoints_tools.kernels`` fills the same blocks a few rows at a time.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..models import keys
from ..models.config import DecoderConfig
from .uniform import average_pair

WIDEN_INITS = ("copy", "average")
_EMBEDDINGS = frozenset((keys.EMBED, keys.POSITIONS, keys.OUTPUT))
"""Widened on the hidden dim only: (rows, E) -> (rows, 2E)."""
_ALL = slice(None)


class Block(NamedTuple):
    """``out[out_rows, out_cols] = block_value(what, llm[src_rows], img[src_rows])``; a vector
    (1-D tensor) has no columns (``out_cols`` None)."""

    out_rows: Any  # a slice (Ellipsis: the whole tensor)
    out_cols: slice | None
    src_rows: Any
    what: str  # "llm" | "img" | "average"


def block_value(what: str, llm: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """The fp32 content of a block: one parent's rows, or both parents' average (Eq. 3's X)."""
    if what == "llm":
        return llm.to(torch.float32)
    if what == "img":
        return img.to(torch.float32)
    if what == "average":
        return average_pair(llm, img)
    raise ValueError(f"unknown block source {what!r}")


def is_copy(what: str) -> bool:
    """The block is one parent's values unchanged (``block_value`` only widens the dtype): it may
    be copied in any dtype, exactly."""
    return what in ("llm", "img")


def _check_init(init: str) -> None:
    if init not in WIDEN_INITS:
        raise ValueError(f"init must be one of {WIDEN_INITS}, got {init!r}")


def _matrix_blocks(rows: int, cols: int, *, at: int, src: int, init: str) -> list[Block]:
    """[[W_llm, X_llm], [W_img, X_img]] for parent rows [src, src + rows) written at output rows
    [at, at + 2 rows) (Eq. 2 / Eq. 3)."""
    x_llm, x_img = ("llm", "img") if init == "copy" else ("average", "average")
    s = slice(src, src + rows)
    top, bottom = slice(at, at + rows), slice(at + rows, at + 2 * rows)
    left, right = slice(0, cols), slice(cols, 2 * cols)
    return [Block(top, left, s, "llm"), Block(top, right, s, x_llm),
            Block(bottom, left, s, "img"), Block(bottom, right, s, x_img)]


def _vector_blocks(n: int, *, at: int, src: int) -> list[Block]:
    """[llm; img] for parent elements [src, src + n) written at [at, at + 2n)."""
    s = slice(src, src + n)
    return [Block(slice(at, at + n), None, s, "llm"), Block(slice(at + n, at + 2 * n), None, s, "img")]


def widen_blocks(name: str, shape: tuple[int, ...], *, parent: DecoderConfig, init: str = "copy") -> list[Block]:
    """Where every element of the widened tensor ``name`` comes from, for parents of ``shape``."""
    _check_init(init)
    shape = tuple(shape)
    if name == keys.VERSION:  # a buffer: the LLM's, as it is
        return [Block(Ellipsis, None, Ellipsis, "llm")]
    if name in _EMBEDDINGS:  # (rows, E) -> (rows, 2E): [llm | img]
        R, E = shape
        return [Block(_ALL, slice(0, E), _ALL, "llm"), Block(_ALL, slice(E, 2 * E), _ALL, "img")]
    if keys.rule_for(name) == "qkv":  # K, V, Q: each widened on its own so heads stay whole
        E = parent.embed_dim
        if shape[0] != 3 * E:
            raise ValueError(f"{name}: qkv has {shape[0]} rows, expected 3 x embed_dim = {3 * E}")
        blocks: list[Block] = []
        for b in range(3):
            if len(shape) == 2:
                blocks += _matrix_blocks(E, shape[1], at=2 * b * E, src=b * E, init=init)
            else:
                blocks += _vector_blocks(E, at=2 * b * E, src=b * E)
        return blocks
    if keys.is_qk_norm(name):  # (heads, D) -> (2 heads, D): each head's own norm, [llm heads; img heads]
        return [Block(slice(0, shape[0]), None, _ALL, "llm"), Block(slice(shape[0], 2 * shape[0]), None, _ALL, "img")]
    if len(shape) == 1:
        return _vector_blocks(shape[0], at=0, src=0)
    if len(shape) == 2:
        return _matrix_blocks(shape[0], shape[1], at=0, src=0, init=init)
    raise ValueError(f"{name}: do not know how to widen a tensor of shape {shape}")


def widened_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The JAM-Width shape of a parent tensor of ``shape``."""
    if name == keys.VERSION:
        return tuple(shape)
    if name in _EMBEDDINGS:
        return (shape[0], 2 * shape[1])
    if keys.is_qk_norm(name):  # one row per head: the heads double, the head width stays
        return (2 * shape[0], *shape[1:])
    return tuple(2 * s for s in shape)


def _fill(blocks: list[Block], llm: torch.Tensor, img: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    for b in blocks:
        dst = out[b.out_rows] if b.out_cols is None else out[b.out_rows, b.out_cols]
        dst.copy_(block_value(b.what, llm[b.src_rows], img[b.src_rows]))
    return out


def widen_matrix(llm: torch.Tensor, img: torch.Tensor, *, init: str) -> torch.Tensor:
    """(out, in) x 2 -> (2 out, 2 in): [[W_llm, X_llm], [W_img, X_img]] (Eq. 2 / Eq. 3), fp32."""
    _check_init(init)
    R, C = llm.shape
    out = torch.empty(2 * R, 2 * C, dtype=torch.float32)
    return _fill(_matrix_blocks(R, C, at=0, src=0, init=init), llm, img, out)


def widen_tensor(
    name: str, llm: torch.Tensor, img: torch.Tensor, *, parent: DecoderConfig, init: str = "copy"
) -> torch.Tensor:
    """One parent tensor pair -> the JAM-Width tensor of the same name (fp32)."""
    if llm.shape != img.shape:
        raise ValueError(f"{name}: LLM parent has shape {tuple(llm.shape)}, image parent {tuple(img.shape)}")
    blocks = widen_blocks(name, tuple(llm.shape), parent=parent, init=init)
    out = torch.empty(widened_shape(name, tuple(llm.shape)), dtype=torch.float32)
    return _fill(blocks, llm, img, out)

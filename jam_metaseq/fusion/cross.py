"""JAM-Cross initialisation (paper §2.1.3): branch weights copied from their parents, new weights fresh.

- ``decoder.layers_llm.{i}.*`` <- LLM ``decoder.layers.{i}.*``; ``decoder.layers_cm3.{i}.*`` <- image parent.
- ``decoder.embed_positions_{llm,cm3}`` <- each parent's ``decoder.embed_positions``.
- shared ``decoder.embed_tokens`` / ``output_projection``: the LLM's rows, with the image-code rows
  [image_vocab_start, image_vocab_end) taken from the image parent ("text tokens from the LLM input
  embedding, image tokens from the image-text model"). Parents whose output projections are
  untied (``tie_embeddings=False``, Llama-3) give the embedding from their embeddings and the
  (then untied) output projection from their output projections, by the same row rule.
- ``decoder.layer_norm``: the parents' average (one final LayerNorm after the feature projection).
- parents of different widths (``CrossConfig.image_parent``): each branch's input embedding
  ``decoder.embed_tokens_{llm,cm3}`` <- its parent's whole embedding; the untied output projection
  (V, W), W the wider width: text rows from the LLM, image rows from the image parent, each in its
  first E_parent columns and zero after; the final LayerNorm: the parents' average on the
  coordinates both have, the wider parent's after; ``preserve``'s feature projection
  [P_img/2, P_llm/2] with rectangular identities (``models.decoder.eye_halves``).
- new parameters (cross blocks, ``feature_projection``): ``paper`` = N(0, init_std) weights, zero
  biases, unit LayerNorms; ``preserve`` additionally zeroes each cross block's ``out_proj`` and ``fc2``
  (the blocks start as identities, so each branch computes exactly its parent) and sets the feature
  projection to [I/2, I/2]. The normal draws depend on (seed, name) only, so the result does not
  depend on the order tensors are streamed in; how they are seeded is the ``init_seed_scheme``:

  - ``per-block`` (the default): element block k (``DRAW_BLOCK`` elements of the flattened tensor)
    is ``torch.randn`` from a CPU generator seeded with ``block_seed(seed, name, k)``. Blocks are
    independent, so they can be drawn in parallel and in any order, with the same bits.
  - ``per-tensor`` (jam-ckpt's only scheme before ``init_seed_scheme`` was recorded): one ``torch.randn`` of the
    whole tensor from a generator seeded with ``tensor_seed(seed, name)``; one stream, one thread.

  Both draw with torch's float32 ``randn`` kernel, whose bits differ between torch's CPU dispatch
  levels (e.g. AVX2 and the DEFAULT kernel used on CPUs without it): a seed reproduces an output on
  CPUs of the same kind.

The rule is data: ``cross_plan`` says where each piece of a tensor comes from (a parent's tensor,
the parents' average, a fresh init, a constant), ``fresh_rule`` which fresh init a new tensor gets.
``cross_tensor`` applies them to whole tensors; ``checkpoints_tools.kernels`` applies the same plan
streaming from readers into reused buffers, calling ``draw_normal`` block by block.
"""

from __future__ import annotations

import zlib
from typing import Callable, NamedTuple

import torch

from ..models import keys
from ..models.config import CrossConfig
from ..models.decoder import eye_halves
from .shapes import state_shapes
from .uniform import average_pair

Getter = Callable[[str], torch.Tensor]
INIT_SEED_SCHEMES = ("per-block", "per-tensor")
DEFAULT_INIT_SEED_SCHEME = "per-block"
DRAW_BLOCK = 1 << 18
"""Elements per independently seeded block of a ``per-block`` draw (1 MiB of fp32)."""


def tensor_seed(seed: int, name: str) -> int:
    """The ``per-tensor`` scheme's generator seed of tensor ``name``."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def block_seed(seed: int, name: str, block: int) -> int:
    """The ``per-block`` scheme's generator seed of element block ``block`` of tensor ``name``: a
    CRC-32 (torch's CPU generator keeps 32 bits of a seed), so the blocks of one tensor, whose
    inputs differ only in the last few bytes, never share a seed."""
    return zlib.crc32(f"{int(seed)}:{name}:{int(block)}".encode())


class Piece(NamedTuple):
    """``out[rows, cols] = `` one source: ``copy`` of parent ``role``'s tensor ``source`` (those
    rows, all its columns), ``average`` of both parents' ``source`` (those rows), ``fresh``
    (``fresh_rule``), ``zeros`` or ``const`` (``keys.VERSION_VALUE``)."""

    rows: slice
    kind: str  # "copy" | "average" | "fresh" | "zeros" | "const"
    role: str | None = None  # "llm" | "img" for copy
    source: str | None = None
    cols: slice = slice(None)  # asymmetric JAM-Cross: a narrower parent's rows in a wider tensor


_ALL = slice(None)


def target(out: torch.Tensor, p: Piece) -> torch.Tensor:
    """The view of ``out`` that piece ``p`` fills."""
    return out[p.rows] if p.cols == _ALL else out[p.rows, p.cols]


def cross_plan(name: str, cfg: CrossConfig) -> list[Piece]:
    """Where the JAM-Cross tensor ``name`` comes from, in order (a later piece overwrites rows of
    an earlier one). Key names and which tensors are new come from the key schema
    (``jam_metaseq/models/keys.py``)."""
    if name == keys.VERSION:
        return [Piece(_ALL, "const")]
    shared = cfg.shared_embedding
    if name in keys.TIED and (shared or name == keys.OUTPUT):
        lo, hi = cfg.image_vocab_start, cfg.image_vocab_end
        if not 0 <= lo < hi <= cfg.vocab_size:
            raise ValueError(
                f"{name}: image_vocab_start/end = {lo}/{hi} must lie in [0, {cfg.vocab_size}] "
                "(set them from the vocab manifest's image range)"
            )
        # The parents' output heads are their embeddings, unless they are untied (Llama-3).
        source = keys.OUTPUT if name == keys.OUTPUT and not cfg.parent.tie_embeddings else keys.EMBED
        if shared:
            return [Piece(_ALL, "copy", "llm", source), Piece(slice(lo, hi), "copy", "img", source)]
        # Widths differ: the untied (V, W) output projection, W the wider width; text rows are
        # the LLM's, image rows the image parent's, each in its first E_parent columns, zeros after.
        W, a, b = cfg.output_dim, cfg.llm.embed_dim, cfg.img.embed_dim
        plan = [Piece(_ALL, "copy", "llm", source, slice(0, a)), Piece(slice(lo, hi), "copy", "img", source,
                                                                       slice(0, b))]
        if a < W:
            plan.insert(1, Piece(_ALL, "zeros", cols=slice(a, W)))
        if b < W:
            plan.append(Piece(slice(lo, hi), "zeros", cols=slice(b, W)))
        return plan
    src = keys.branch_source(name)
    if src is not None and (shared or name not in keys.TIED):
        side, source = src
        return [Piece(_ALL, "copy", side, source)]
    if name in {e.name for e in keys.FINAL_NORM}:
        m, W = min(cfg.llm.embed_dim, cfg.img.embed_dim), cfg.output_dim
        if m == W:
            return [Piece(_ALL, "average", None, name)]
        # The wider parent's norm, averaged with the narrower one's where both have coordinates.
        wider = "llm" if cfg.llm.embed_dim == W else "img"
        return [Piece(slice(0, m), "average", None, name), Piece(slice(m, W), "copy", wider, name)]
    if keys.is_cross_new(name):
        return [Piece(_ALL, "fresh")]
    raise KeyError(f"{name}: not a JAM-Cross tensor")


def fresh_rule(name: str, cfg: CrossConfig) -> str:
    """The init of a new JAM-Cross parameter: ``zeros``, ``ones``, ``eye_halves`` ([I/2, I/2]) or
    ``normal`` (N(0, init_std), drawn per ``init_seed_scheme``): the key schema's ``init_rule``,
    the same rule the model's own init follows."""
    return keys.init_rule(name, cfg)


def check_scheme(scheme: str) -> None:
    if scheme not in INIT_SEED_SCHEMES:
        raise ValueError(f"init_seed_scheme must be one of {INIT_SEED_SCHEMES}, got {scheme!r}")


def draw_normal(name: str, numel: int, out: torch.Tensor, *, cfg: CrossConfig, seed: int,
                scheme: str = DEFAULT_INIT_SEED_SCHEME, start: int = 0) -> torch.Tensor:
    """Elements [start, start + out.numel()) of the flattened N(0, init_std) draw of the
    ``numel``-element tensor ``name``, into ``out`` (fp32, contiguous). ``per-block``: ``start``
    is a multiple of ``DRAW_BLOCK`` and the range ends on a block boundary or at ``numel``;
    ``per-tensor``: the whole tensor (one stream)."""
    check_scheme(scheme)
    n = out.numel()
    flat = out.view(-1)
    if scheme == "per-tensor":
        if start != 0 or n != numel:
            raise ValueError(f"{name}: the per-tensor scheme draws the whole tensor at once")
        g = torch.Generator().manual_seed(tensor_seed(seed, name))
        torch.randn(tuple(out.shape), generator=g, out=out)
        return out.mul_(cfg.parent.init_std)
    end = start + n
    if start % DRAW_BLOCK or not (end % DRAW_BLOCK == 0 or end == numel) or end > numel:
        raise ValueError(f"{name}: elements [{start}, {end}) of {numel} are not whole blocks of {DRAW_BLOCK}")
    for b0 in range(start, end, DRAW_BLOCK):
        b1 = min(end, b0 + DRAW_BLOCK)
        g = torch.Generator().manual_seed(block_seed(seed, name, b0 // DRAW_BLOCK))
        torch.randn(b1 - b0, generator=g, out=flat[b0 - start:b1 - start])
    return out.mul_(cfg.parent.init_std)


def fresh_tensor(name: str, shape: tuple[int, ...], *, cfg: CrossConfig, seed: int,
                 scheme: str = DEFAULT_INIT_SEED_SCHEME) -> torch.Tensor:
    """A new parameter of JAM-Cross, initialised per ``cfg.cross_init`` (see module docstring), fp32."""
    rule = fresh_rule(name, cfg)
    if rule == "zeros":
        return torch.zeros(shape)
    if rule == "ones":
        return torch.ones(shape)
    if rule == "eye_halves":
        return eye_halves(cfg)
    numel = 1
    for s in shape:
        numel *= int(s)
    return draw_normal(name, numel, torch.empty(shape), cfg=cfg, seed=seed, scheme=scheme)


def cross_tensor(name: str, *, cfg: CrossConfig, llm: Getter, img: Getter, seed: int = 0,
                 scheme: str = DEFAULT_INIT_SEED_SCHEME) -> torch.Tensor:
    """The JAM-Cross tensor ``name`` built from the parents' tensors (fetched lazily by name), fp32."""
    plan = cross_plan(name, cfg)  # first: it names what is wrong with ``name`` or ``cfg``
    out = torch.empty(state_shapes(cfg)[name])
    for p in plan:
        if p.kind == "const":
            value = torch.tensor([keys.VERSION_VALUE])
        elif p.kind == "copy":
            value = (llm if p.role == "llm" else img)(p.source)[p.rows].to(torch.float32)
        elif p.kind == "average":
            value = average_pair(llm(p.source)[p.rows], img(p.source)[p.rows])
        elif p.kind == "zeros":
            value = torch.zeros(())
        else:
            value = fresh_tensor(name, tuple(out.shape), cfg=cfg, seed=seed, scheme=scheme)
        target(out, p).copy_(value)
    return out

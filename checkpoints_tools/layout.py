"""Model-parallel split and join of state-dict tensors, by the rule the key schema gives each key.

Which rule a tensor follows is data in ``jam_metaseq.models.keys`` (``rule_for``); this module
applies it. ``join(split(t, M)) == t`` bitwise for every rule, which is what makes resharding
N -> M exact.

- ``replicated``: every rank holds the whole tensor (LayerNorms, positions, row-parallel biases).
- ``vocab``: vocab-parallel embedding / output projection: rows split evenly (V % M == 0).
- ``column``: column-parallel linear: output rows split (fc1, the gate, cross-attention q/k/v,
  separate self-attention q/k/v: whole query heads, and whole k/v heads, per rank).
- ``row``: row-parallel linear: input columns split, dim 1 (out_proj, fc2).
- ``qkv``: the fused self-attention projection: rank r holds ``[K_r; V_r; Q_r]``, so joining N
  parts splits each in three and concatenates the K parts, then V, then Q (not the parts).
"""

from __future__ import annotations

from typing import Sequence

import torch

from jam_metaseq.models.keys import Rule, rule_for

__all__ = ["Rule", "check_mp", "destinations", "full_shape", "join", "join_into", "part_shape", "rule_for",
           "split"]


def split(name: str, tensor: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """Split a consolidated tensor into ``parts`` model-parallel pieces (views where possible)."""
    if parts == 1:
        return [tensor]
    rule = rule_for(name)
    if rule == "replicated":
        return [tensor] * parts
    if rule == "row":
        _check_div(name, tensor.shape[1], parts, "columns")
        return list(torch.chunk(tensor, parts, dim=1))
    if rule in ("vocab", "column"):
        _check_div(name, tensor.shape[0], parts, "rows")
        return list(torch.chunk(tensor, parts, dim=0))
    # qkv: (3E, ...) in [K; V; Q]; rank r gets [K_r; V_r; Q_r].
    _check_div(name, tensor.shape[0], 3 * parts, "rows (3 x parts)")
    k, v, q = torch.chunk(tensor, 3, dim=0)
    ks, vs, qs = (torch.chunk(x, parts, dim=0) for x in (k, v, q))
    return [torch.cat([ks[r], vs[r], qs[r]], dim=0) for r in range(parts)]


def join(name: str, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``split``: the consolidated tensor from N model-parallel pieces."""
    if len(pieces) == 1:
        return pieces[0]
    rule = rule_for(name)
    if rule == "replicated":
        return pieces[0]
    if rule == "row":
        return torch.cat(list(pieces), dim=1)
    if rule in ("vocab", "column"):
        return torch.cat(list(pieces), dim=0)
    thirds = [torch.chunk(p, 3, dim=0) for p in pieces]
    return torch.cat([t[i] for i in range(3) for t in thirds], dim=0)


def destinations(name: str, out: torch.Tensor, piece_shape: Sequence[int], rank: int,
                 parts: int) -> list[tuple[torch.Tensor, slice]]:
    """Where rank ``rank``'s piece goes in the consolidated ``out``: [(view of out, rows of the
    piece)], so callers can fill ``out`` straight from a file (``join`` without intermediates)."""
    rows = int(piece_shape[0]) if len(piece_shape) else 0
    if parts == 1 or rule_for(name) == "replicated":
        return [(out, slice(0, rows))] if rank == 0 else []
    rule = rule_for(name)
    if rule == "row":
        w = int(piece_shape[1])
        return [(out[:, rank * w:(rank + 1) * w], slice(0, rows))]
    if rule in ("vocab", "column"):
        return [(out[rank * rows:(rank + 1) * rows], slice(0, rows))]
    third, block = rows // 3, out.shape[0] // 3  # qkv: piece = [K_r; V_r; Q_r]
    return [(out[i * block + rank * third:i * block + (rank + 1) * third], slice(i * third, (i + 1) * third))
            for i in range(3)]


def join_into(name: str, out: torch.Tensor, piece: torch.Tensor, rank: int, parts: int) -> None:
    """Copy one rank's ``piece`` into its place in the consolidated ``out``."""
    for dest, rows in destinations(name, out, piece.shape, rank, parts):
        dest.copy_(piece[rows])


def part_shape(name: str, shape: Sequence[int], parts: int) -> tuple[int, ...]:
    """Shape of one rank's piece of a tensor of consolidated ``shape``."""
    shape = tuple(int(s) for s in shape)
    rule = rule_for(name)
    if parts == 1 or rule == "replicated":
        return shape
    if rule == "row":
        return (shape[0], shape[1] // parts, *shape[2:])
    return (shape[0] // parts, *shape[1:])


def full_shape(name: str, piece_shape: Sequence[int], parts: int) -> tuple[int, ...]:
    """Consolidated shape from one rank's piece shape."""
    shape = tuple(int(s) for s in piece_shape)
    rule = rule_for(name)
    if parts == 1 or rule == "replicated":
        return shape
    if rule == "row":
        return (shape[0], shape[1] * parts, *shape[2:])
    return (shape[0] * parts, *shape[1:])


def check_mp(*, heads: int, vocab_size: int, ffn_dim: int, embed_dim: int, parts: int,
             what: str = "model", kv_heads: int | None = None) -> None:
    """Stop when ``parts`` does not divide what model parallelism splits (``kv_heads``: grouped
    k/v heads, split whole per rank with their query heads)."""
    for label, n in (("attention heads", heads), ("k/v heads (num_key_value_heads)", kv_heads or heads),
                     ("vocabulary rows", vocab_size), ("FFN dim", ffn_dim), ("embed dim", embed_dim)):
        if n % parts:
            raise ValueError(f"{what}: model-parallel size {parts} does not divide its {label} ({n})")


def _check_div(name: str, n: int, parts: int, what: str) -> None:
    if n % parts:
        raise ValueError(f"tensor {name}: {n} {what} not divisible by model-parallel size {parts}")

"""Explicit key/value cache for incremental decoding (house style: allocated in ``setup_caches``).

One preallocated buffer per attention *slot* (a self-attention layer, or one direction of a JAM-Cross
cross block), plus the per-row bookkeeping that positions (metaseq's learned ones or rotary ones:
both count each row's real tokens) and left padding need. A grouped-query model stores its k/v
heads, not its query heads (``heads`` = ``DecoderConfig.num_kv_heads``).

Two ways to append: ``write`` (the dynamic path) returns the keys written so far, so shapes grow
every step; ``write_at`` (static decode steps, ``decoder.build_static_context``) writes at the
device-side ``offset`` and returns a fixed span of keys, so a step has the same shapes every time and
needs no host sync (what a CUDA graph needs). Both keep ``length`` (host) and ``offset`` (device) equal.
"""

from __future__ import annotations

from typing import Sequence

import torch


class KVCache:
    """Keys/values for ``num_slots`` attention modules of one model, ``(B, H, max_len, D)`` each.

    Slots of one shape share one buffer ``(S, B, H, max_len, D)``. ``slot_shapes`` ((heads,
    head dim) per slot; asymmetric JAM-Cross, whose branches differ in heads or head dim) groups
    the slots by shape, one buffer per group; ``k``/``v`` are then the first group's buffers and
    ``buffers()`` lists them all."""

    def __init__(
        self,
        *,
        num_slots: int,
        batch_size: int,
        heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        slot_shapes: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        shapes = [(heads, head_dim)] * num_slots if slot_shapes is None else [tuple(s) for s in slot_shapes]
        if len(shapes) != num_slots:
            raise ValueError(f"{len(shapes)} slot shapes for {num_slots} slots")
        kinds: list[tuple[int, int]] = list(dict.fromkeys(shapes))
        # slot -> (group, index in the group)
        self.slot_map = [(kinds.index(s), shapes[:n].count(s)) for n, s in enumerate(shapes)]
        self.groups_k = [torch.zeros((shapes.count(s), batch_size, s[0], max_len, s[1]), dtype=dtype, device=device)
                         for s in kinds]  # each (S_g, B, H_g, L, D_g)
        self.groups_v = [torch.zeros_like(k) for k in self.groups_k]
        # True where the cached key is padding (never attended to).
        self.key_padding = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        # Non-pad tokens seen so far per row: the next real token's position is this + pad + 1.
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        # ``length`` on the device: static steps read it, so a captured step needs no host value.
        self.offset = torch.zeros((), dtype=torch.long, device=device)
        self.max_len = max_len
        self.batch_size = batch_size

    @property
    def k(self) -> torch.Tensor:
        """The keys of the first slot group (every slot's when all slots share a shape)."""
        return self.groups_k[0]

    @property
    def v(self) -> torch.Tensor:
        return self.groups_v[0]

    def buffers(self) -> list[torch.Tensor]:
        """Every key and value buffer."""
        return [*self.groups_k, *self.groups_v]

    def _slot(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        g, i = self.slot_map[slot]
        return self.groups_k[g][i], self.groups_v[g][i]

    def reset(self) -> None:
        self.key_padding.zero_()
        self.positions.zero_()
        self.offset.zero_()
        self.length = 0

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_len:
            raise ValueError(
                f"KV cache holds {self.max_len} positions; {self.length} used, {new_tokens} more asked"
            )

    def write(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, D) keys/values at the current offset; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        ks, vs = self._slot(slot)
        ks[:, :, start:end] = k
        vs[:, :, start:end] = v
        return ks[:, :, :end], vs[:, :, :end]

    def write_at(
        self, slot: int, k: torch.Tensor, v: torch.Tensor, *, index: torch.Tensor, span: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, D) keys/values at the device positions ``index`` (T,); return the first
        ``span`` keys/values, (B, H, span, D), whatever has been written (the caller masks)."""
        ks, vs = self._slot(slot)
        ks.index_copy_(2, index, k)
        vs.index_copy_(2, index, v)
        return ks[:, :, :span], vs[:, :, :span]

    def advance(self, nonpad: torch.Tensor, steps: int) -> None:
        """After a forward pass over ``steps`` tokens per row, ``nonpad`` (B,) of them real."""
        self.positions += nonpad
        self.offset += steps  # in place on the device: a captured step replays it
        self.length += steps

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` of the batch (e.g. after finished sequences are dropped)."""
        self.groups_k = [k[:, rows] for k in self.groups_k]
        self.groups_v = [v[:, rows] for v in self.groups_v]
        self.key_padding = self.key_padding[rows]
        self.positions = self.positions[rows]
        self.batch_size = int(self.k.shape[1])

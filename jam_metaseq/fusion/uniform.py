"""JAM-Uniform (paper §2.1.1, Eq. 1): theta = sum_i w_i theta_i, default w_i = 1/N (1/2 for two).

Also the parents' plain average ``average_pair`` (Eq. 3's off-diagonal blocks, JAM-Cross's final
LayerNorm). Both are element-wise: applied to any slice of the parents they give that slice of
the result, which is how ``checkpoints_tools.kernels`` streams them chunk by chunk.
"""

from __future__ import annotations

from typing import Sequence

import torch


def merge_tensor(name: str, tensors: Sequence[torch.Tensor], *, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Weighted average of one tensor across N parents, accumulated in fp32; returns fp32."""
    if not tensors:
        raise ValueError(f"{name}: no parent tensors to merge")
    if weights is None:
        weights = [1.0 / len(tensors)] * len(tensors)
    if len(weights) != len(tensors):
        raise ValueError(f"{name}: {len(tensors)} parents but {len(weights)} weights")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise ValueError(f"{name}: parent {i} has shape {tuple(t.shape)}, parent 0 has {tuple(shape)}")
    out = torch.zeros(shape, dtype=torch.float32)
    for w, t in zip(weights, tensors):
        out.add_(t.to(torch.float32), alpha=float(w))
    return out


def average_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a + b) / 2 in fp32: the two parents' average (Eq. 3; JAM-Cross's final LayerNorm)."""
    return (a.to(torch.float32) + b.to(torch.float32)) / 2

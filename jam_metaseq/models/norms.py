"""The normalisations of the decoder block: metaseq's LayerNorm (OPT) or RMSNorm (the Llama family;
Gemma's (1 + w) form), chosen by ``DecoderConfig.norm``; the fusion code concatenates (JAM-Width)
or averages (JAM-Uniform, JAM-Cross's final norm) their weights alike. Chameleon's per-head query /
key LayerNorm (``DecoderConfig.qk_norm``) is ``HeadNorm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig


class RMSNorm(nn.Module):
    """x / rms(x) over the last dim, in fp32, then the weight: ``w * y`` cast first (Llama, Qwen2:
    ``rmsnorm``) or ``(1 + w) * y`` cast after (Gemma: ``rmsnorm_plus_one``, whose weight starts at
    0). The two casts are HF's, and differ only below fp32; no weight with ``affine=False``."""

    def __init__(self, dim: int, *, eps: float, affine: bool, plus_one: bool) -> None:
        super().__init__()
        self.eps = eps
        self.plus_one = plus_one
        if affine:
            self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.weight is None:
            return y.to(x.dtype)
        if self.plus_one:
            return (y * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * y.to(x.dtype)


QK_NORM_EPS = 1e-5
"""Epsilon of Chameleon's q/k norms: torch's LayerNorm default, which Meta's code uses and HF's
``ChameleonLayerNorm`` fixes (it does not read ``rms_norm_eps``)."""


class HeadNorm(nn.Module):
    """LayerNorm over each head's D features with that head's own weight and bias, (heads, D) each:
    (B, h, T, D) -> (B, h, T, D), computed in the input dtype (HF ``ChameleonLayerNorm``).

    Statistics are per head and token, so a model-parallel rank holding heads [a, b) needs only
    rows [a, b) of the weight and bias: they split by heads, like the q/k projections' rows
    (``keys``: rule ``column``). ``h`` is read off the input, so a rank's module holds its rows."""

    def __init__(self, heads: int, head_dim: int, *, eps: float = QK_NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, (x.shape[-1],), eps=self.eps)
        return y * self.weight[:, None, :] + self.bias[:, None, :]


def make_norm(dim: int, cfg: DecoderConfig) -> nn.Module:
    """The config's normalisation over ``dim`` features (every norm of a block, and the final one)."""
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.ln_eps, elementwise_affine=cfg.affine_ln, bias=cfg.affine_ln)
    return RMSNorm(dim, eps=cfg.ln_eps, affine=cfg.affine_ln, plus_one=cfg.norm == "rmsnorm_plus_one")

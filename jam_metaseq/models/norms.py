"""The normalisations of the decoder block: metaseq's LayerNorm (OPT) or RMSNorm (the Llama family;
Gemma's (1 + w) form), chosen by ``DecoderConfig.norm``; the fusion code concatenates (JAM-Width)
or averages (JAM-Uniform, JAM-Cross's final norm) their weights alike.
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


def make_norm(dim: int, cfg: DecoderConfig) -> nn.Module:
    """The config's normalisation over ``dim`` features (every norm of a block, and the final one)."""
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.ln_eps, elementwise_affine=cfg.affine_ln, bias=cfg.affine_ln)
    return RMSNorm(dim, eps=cfg.ln_eps, affine=cfg.affine_ln, plus_one=cfg.norm == "rmsnorm_plus_one")

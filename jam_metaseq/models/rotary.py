"""Rotary position embeddings (RoPE) of the Llama family, in HF's layout (issue 23).

A head's D dims rotate in pairs (i, i + D/2) (the half-split ``rotate_half`` layout of HF
``modeling_llama.py``; Meta's original checkpoints interleave pairs (2i, 2i + 1) and HF's converter
permutes their q/k rows), by the angle position x theta^(-2i/D), the frequencies optionally scaled
(``DecoderConfig.rope_scaling``: ``linear``, ``llama3``). ``decoder.rotary_positions`` gives the
positions (each row's real tokens 0, 1, ...); the decoder applies ``apply_rotary`` to q and k of
every attention, per head, before the KV cache.
"""

from __future__ import annotations

import functools
import math

import torch

from .config import DecoderConfig


@functools.lru_cache(maxsize=64)
def _inv_freq(head_dim: int, theta: float, scaling: tuple) -> torch.Tensor:
    """(D/2,) fp32 rotary inverse frequencies theta^(-2i/D), scaled per ``rope_scaling`` (HF
    ``modeling_rope_utils``: ``linear`` divides them by the factor; ``llama3`` divides the low
    frequencies by it, keeps the high ones and interpolates between them), on the CPU."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    s = dict(scaling)
    kind = s.get("rope_type")
    if kind == "linear":
        inv = inv / s["factor"]
    elif kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        context = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = context / lo, context / hi  # long waves: scaled; short: kept
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (context / wavelen - lo) / (hi - lo)  # 0 at the low end of the band, 1 at the high end
        between = (1 - smooth) * scaled / factor + smooth * scaled
        in_band = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv = torch.where(in_band, between, scaled)
    elif kind is not None:  # DecoderConfig refuses it first
        raise ValueError(f"rope scaling type {kind!r} is not supported")
    return inv


@functools.lru_cache(maxsize=64)
def _inv_freq_on(head_dim: int, theta: float, scaling: tuple, device: torch.device) -> torch.Tensor:
    # One copy per device, made outside any CUDA-graph capture (prefill and the warm-up run first).
    return _inv_freq(head_dim, theta, scaling).to(device)


def rotary_tables(positions: torch.Tensor, *, cfg: DecoderConfig, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) positions -> (cos, sin), each (B, 1, T, D) in ``dtype``: angle position x inv_freq
    in fp32, the D/2 frequencies repeated for the two halves (HF's layout)."""
    scaling = tuple(sorted((cfg.rope_scaling or {}).items()))
    inv = _inv_freq_on(cfg.head_dim, float(cfg.rope_theta), scaling, positions.device)
    freqs = positions[..., None].float() * inv  # (B, T, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, H, T, D) in the half-split layout: x * cos + rotate_half(x) * sin, where
    rotate_half(x) = [-x2, x1] for the halves x1 = x[..., :D/2], x2 = x[..., D/2:]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# ---- the other rotary row order ------------------------------------------------------------------
# Meta's original Llama checkpoints and llama.cpp's GGUF files rotate dims (2i, 2i + 1) of a head
# together (interleaved); this decoder and HF rotate (i, i + D/2) (half-split). The same model is
# stored either way by reordering the q and k projections' rows within each head (their bias too):
# interleaved row 2i + j is half-split row i + j * D/2. llama.cpp's converter applies
# ``half_split_to_interleaved`` to HF's q/k (its ``permute``); reading a GGUF applies the inverse.

def interleaved_to_half_split(rows: torch.Tensor, *, heads: int) -> torch.Tensor:
    """(heads * D, ...) q or k rows (weight or bias) in the interleaved order -> the half-split one."""
    d = rows.shape[0] // heads
    if heads < 1 or d * heads != rows.shape[0] or d % 2:
        raise ValueError(f"{rows.shape[0]} rows are not {heads} heads of an even width")
    return rows.reshape(heads, d // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def half_split_to_interleaved(rows: torch.Tensor, *, heads: int) -> torch.Tensor:
    """The inverse of ``interleaved_to_half_split``."""
    d = rows.shape[0] // heads
    if heads < 1 or d * heads != rows.shape[0] or d % 2:
        raise ValueError(f"{rows.shape[0]} rows are not {heads} heads of an even width")
    return rows.reshape(heads, 2, d // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)

"""Token sampling for the generator: temperature, top-k, top-p, repetition penalty (paper §3.1).

The paper samples with temperature tau = 1 and top-p between 0.8 and 1 (Holtzman et al. 2019).
Every knob is a per-row tensor so rows of one batch may use different settings (text rows and
image rows of one step differ), and randomness comes from a *counter-based* generator: the
uniform number of row ``b`` at decode step ``t`` is a hash of
``(seed_b, t)``. That makes sampling

- reproducible (same seed, same output; the random numbers are the same on every device, the
  logits only up to the device's rounding),
- independent of batch composition (a prompt gives the same answer alone or batched with others,
  which a shared ``torch.Generator`` stream cannot give), and
- free of host synchronisation (seeds and step are tensors; nothing is read back).

Sampling is an inverse-CDF draw from ``softmax(filtered logits / tau)`` with the row's single
uniform number ``u = hash(seed_b, t)``: one hash per row instead of one per vocabulary entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jam_metaseq.inputs import check_float, check_int

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingConfig:
    """How one modality's next token is drawn."""

    temperature: float = 1.0
    """Softmax temperature tau; 0 = greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty on tokens already seen (1 = off): positive logits / p, negative * p."""

    def __post_init__(self) -> None:
        # finite and in range: a NaN passes every ``<`` check and samples all-zero ids
        check_float(self.temperature, name="temperature", lo=0.0)
        check_float(self.top_p, name="top_p", lo=0.0, hi=1.0, lo_open=True)
        check_int(self.top_k, name="top_k", lo=0)
        check_float(self.repetition_penalty, name="repetition_penalty", lo=0.0, lo_open=True)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32, Wellons) on int64 tensors holding values < 2**32."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    x = x ^ (x >> 16)
    return x


def row_uniform(seeds: torch.Tensor, step: torch.Tensor | int) -> torch.Tensor:
    """One uniform number in (0, 1) per row, (B,), a pure function of (seed_b, step).

    ``seeds`` (B,) int64; ``step`` a python int or 0-d / (B,) int64 tensor.
    """
    seeds = seeds.to(torch.int64)
    # A python step is hashed on the host (same integer arithmetic, no host-to-device copy); a tensor
    # step stays on the device (a captured decode step reads it from its buffer).
    step_hash = _hash32(step + 0x27D4EB2F) if not torch.is_tensor(step) else _hash32(step.to(torch.int64) + 0x27D4EB2F)
    h = _hash32(_hash32(seeds * 0x9E3779B1 + 0x632BE5AB) ^ step_hash)
    # 24 random bits -> float32 exactly, centred in its bin so u is never 0 or 1.
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def apply_repetition_penalty(
    logits: torch.Tensor, *, seen: torch.Tensor, penalty: torch.Tensor | float
) -> torch.Tensor:
    """CTRL penalty (Keskar et al. 2019): seen tokens' logits divided (if > 0) or multiplied by p.

    ``logits`` (B, V) float, ``seen`` (B, V) bool, ``penalty`` float or (B,) tensor.
    """
    if not torch.is_tensor(penalty):
        penalty = torch.full((logits.shape[0],), float(penalty), device=logits.device)
    p = penalty.to(logits.dtype)[:, None]  # (B, 1)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(
    logits: torch.Tensor, *, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Set logits outside the per-row top-k / nucleus to -inf; one sort serves both.

    ``logits`` (B, V) float (already temperature-scaled), ``top_k`` (B,) int64 (0 = off),
    ``top_p`` (B,) float (1 = off). The most likely token always survives.
    """
    B, V = logits.shape
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    rank = torch.arange(V, device=logits.device)[None, :]  # (1, V)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))[:, None]  # (B, 1)
    drop = rank >= k
    probs = sorted_logits.float().softmax(dim=-1)
    # Mass strictly before each token: a token is kept while that mass is below top_p.
    mass_before = probs.cumsum(dim=-1) - probs
    drop = drop | (mass_before >= top_p.to(probs.dtype)[:, None])
    drop[:, 0] = False
    drop_unsorted = torch.zeros_like(drop).scatter_(1, order, drop)
    return logits.masked_fill(drop_unsorted, float("-inf"))


def sample(
    logits: torch.Tensor,
    *,
    seeds: torch.Tensor,
    step: torch.Tensor | int,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw one token per row: (B, V) logits -> (B,) int64.

    Disallowed tokens should already be -inf. ``temperature`` (B,) float, 0 = greedy for that row.
    ``top_k``/``top_p`` (B,) or None (off for every row: skips the sort).
    """
    logits = logits.float()
    greedy = temperature <= 0
    tau = torch.where(greedy, torch.ones_like(temperature), temperature).float()[:, None]  # (B, 1)
    scaled = logits / tau
    if top_k is not None or top_p is not None:
        B = logits.shape[0]
        if top_k is None:
            top_k = torch.zeros(B, dtype=torch.int64, device=logits.device)
        if top_p is None:
            top_p = torch.ones(B, device=logits.device)
        scaled = filter_top_k_top_p(scaled, top_k=top_k, top_p=top_p)
    # Inverse-CDF draw with one uniform per row: (seed, step) alone decide the row's token.
    weights = (scaled - scaled.max(dim=-1, keepdim=True).values).exp()  # (B, V), 0 where -inf
    cdf = weights.cumsum(dim=-1)
    u = row_uniform(seeds, step)[:, None] * cdf[:, -1:]  # (B, 1)
    drawn = torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=logits.shape[-1] - 1)
    # Rounding may land past the last positive weight: fall back to the mode there.
    drawn = torch.where(weights.gather(1, drawn[:, None])[:, 0] > 0, drawn, weights.argmax(dim=-1))
    return torch.where(greedy, logits.argmax(dim=-1), drawn)

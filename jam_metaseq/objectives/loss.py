"""Host-neutral criterion math for the CM3 objective (JAM §3.1 "Objective"; CM3, Aghajanyan 2022).

The model is trained with the plain left-to-right loss -log p(x) on CM3-transformed sequences.
Per target token t with weight w_t (0 on padding, on tokens outside the loss mask such as the
prompt in instruction mode, and optionally on CM3 sentinel targets):

    loss = sum_t w_t * nll_t                  (what is back-propagated; divided by sum_t w_t)

and for reporting, unweighted sums over the tokens that count (w_t > 0), split by the target's
modality: text ids, image-code ids, and the rest (<break>, </s>, sentinels, <eoss>), so validation
gives text PPL and image PPL separately as in the paper's Tables 1-5.

``per_token_nll`` works on full-vocabulary logits; a host with vocabulary-parallel logits computes
its own nll (B, T) and calls ``reduce_token_nll``. Nothing here imports a host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jam_metaseq.vocab import PAD, VocabManifest


@dataclass
class CM3LossOutput:
    """Sums over one batch (all 0-dim fp32 tensors, summable across batches and workers)."""

    loss: torch.Tensor
    """sum_t w_t * nll_t (natural log)."""
    weight_sum: torch.Tensor
    """sum_t w_t: the normaliser (fairseq ``sample_size``)."""
    nll_sum: torch.Tensor
    """sum of nll over tokens with w_t > 0."""
    ntokens: torch.Tensor
    """number of tokens with w_t > 0."""
    text_nll_sum: torch.Tensor
    """sum of nll over counted tokens whose target is a text id."""
    text_tokens: torch.Tensor
    """number of counted text targets."""
    image_nll_sum: torch.Tensor
    """sum of nll over counted tokens whose target is an image code."""
    image_tokens: torch.Tensor
    """number of counted image targets."""


def token_weights(targets: torch.Tensor, *, vocab: VocabManifest, loss_mask: torch.Tensor | None = None,
                  sentinel_weight: float = 1.0, padding_idx: int = PAD) -> torch.Tensor:
    """Per-target weights (B, T) fp32: 0 on padding, ``loss_mask`` applied, sentinel targets scaled.

    ``loss_mask`` (B, T), bool or float, is aligned with ``targets``; ``sentinel_weight=0`` is CM3's
    zero weight on predicting the sentinels themselves.
    """
    w = (targets != padding_idx).to(torch.float32)
    if loss_mask is not None:
        if loss_mask.shape != targets.shape:
            raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} != targets shape {tuple(targets.shape)}")
        w = w * loss_mask.to(torch.float32)
    if sentinel_weight != 1.0:
        w = torch.where(vocab.is_sentinel(targets), w * sentinel_weight, w)
    return w


def per_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] (B, T), computed in fp32 whatever the logits' dtype."""
    b, t, v = logits.shape
    if targets.shape != (b, t):
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match logits {tuple(logits.shape)}")
    nll = F.cross_entropy(logits.reshape(b * t, v).float(), targets.reshape(b * t), reduction="none")
    return nll.view(b, t)


def reduce_token_nll(nll: torch.Tensor, targets: torch.Tensor, *, vocab: VocabManifest,
                     weights: torch.Tensor) -> CM3LossOutput:
    """Weighted loss and per-modality sums from per-token nll (B, T)."""
    nll = nll.float()
    counted = weights > 0  # (B, T)
    is_text = vocab.is_text(targets) & counted
    is_image = vocab.is_image(targets) & counted
    # masked_fill rather than multiply, so that an inf/nan nll on a weight-0 token cannot leak.
    zero = torch.zeros((), dtype=nll.dtype, device=nll.device)
    return CM3LossOutput(
        loss=torch.where(counted, nll * weights, zero).sum(),
        weight_sum=weights.float().sum(),
        nll_sum=torch.where(counted, nll, zero).sum(),
        ntokens=counted.sum().float(),
        text_nll_sum=torch.where(is_text, nll, zero).sum().detach(),
        text_tokens=is_text.sum().float(),
        image_nll_sum=torch.where(is_image, nll, zero).sum().detach(),
        image_tokens=is_image.sum().float(),
    )


def cm3_loss(logits: torch.Tensor, targets: torch.Tensor, *, vocab: VocabManifest,
             loss_mask: torch.Tensor | None = None, sentinel_weight: float = 1.0,
             padding_idx: int = PAD) -> CM3LossOutput:
    """The CM3 criterion on full logits (B, T, V) and targets (B, T)."""
    weights = token_weights(targets, vocab=vocab, loss_mask=loss_mask, sentinel_weight=sentinel_weight,
                            padding_idx=padding_idx)
    return reduce_token_nll(per_token_nll(logits, targets), targets, vocab=vocab, weights=weights)


def perplexity(nll_sum: float, count: float) -> float:
    """exp(mean nll) in natural log; ``nan`` for no tokens, ``inf`` on overflow."""
    if count <= 0:
        return float("nan")
    try:
        return math.exp(nll_sum / count)
    except OverflowError:
        return float("inf")

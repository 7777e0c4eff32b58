"""Classifier-free guidance for image tokens (paper §3.1, Eq. 6; Gafni et al. 2022).

    logits_cf = logits_uncond + alpha * (logits_cond - logits_uncond)

``logits_cond`` = T(t_y | t_x), the model given the prompt; ``logits_uncond`` = T(t_y | <mask>),
the same model given the prompt with its text cut out and replaced by ``<mask>`` (the CM3 infilling
input, so no extra training is needed). Both rows run in one batched forward pass; only image
tokens are guided, and both rows of a pair are fed the same sampled token.
"""

from __future__ import annotations

from typing import Sequence

import torch

from jam_metaseq.vocab import VocabManifest

DEFAULT_ALPHA = 3.5


def unconditional_prompt(prompt: Sequence[int], *, vocab: VocabManifest) -> list[int]:
    """The prompt with each maximal run of text tokens replaced by one ``<mask>`` (vocab.mask_id).

    Special tokens (bos, eos, ``<break>``) and image codes stay, so an image in the prompt still
    conditions the unconditional row; a prompt with no text is returned unchanged.
    """
    out: list[int] = []
    in_text = False
    for t in prompt:
        t = int(t)
        is_text = bool(vocab.is_text(t))
        if is_text and not in_text:
            out.append(vocab.mask_id)
        elif not is_text:
            out.append(t)
        in_text = is_text
    return out


def blend(cond: torch.Tensor, uncond: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """Eq. 6 on (B, V) logits. alpha = 1 returns ``cond`` and alpha = 0 ``uncond`` exactly."""
    if alpha == 1.0:
        return cond
    if alpha == 0.0:
        return uncond
    return uncond + alpha * (cond - uncond)

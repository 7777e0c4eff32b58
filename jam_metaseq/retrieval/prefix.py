"""Retrieved documents as a prefix of a training sequence or prompt (paper §3.1 "Retrieval Augmentation").

RA-CM3 / CM3leon prepend the retrieved documents to the sequence the model is trained on (and,
at inference, to the prompt). The layout chosen here, since our vocabulary has no dedicated
retrieval separator (``jam_metaseq/vocab.py`` is shared and frozen):

    [bos] doc_1 <eos> doc_2 <eos> ... doc_k <eos> main sequence ...

- ``<eos>`` separates documents, as between packed documents in ordinary LM training, so a
  model never has to learn a new token; ``<break>`` is not used because it frames images and
  would make the mixed-modal decoder start an image.
- Each retrieved document is stripped of a leading ``<bos>`` and trailing ``<eos>`` first.
- Truncation rule (the prefix must fit ``max_len``): documents are taken in rank order (best
  first) while they fit whole; the first one that does not fit is cut at the last position that
  does not split an image (``<break> code ... code <break>`` is kept whole or dropped whole) and
  is kept only if something remains; later documents are dropped. The main sequence is never cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jam_metaseq.vocab import VocabManifest


def _strip_specials(doc: np.ndarray, *, vocab: VocabManifest) -> np.ndarray:
    body = np.asarray(doc, dtype=np.int64).reshape(-1)
    if body.size and body[0] == vocab.bos:
        body = body[1:]
    if body.size and body[-1] == vocab.eos:
        body = body[:-1]
    return body


def safe_cut(tokens: np.ndarray, *, limit: int, vocab: VocabManifest) -> int:
    """Largest ``c <= limit`` such that ``tokens[:c]`` ends outside every image (0 if none).

    A cut after position ``c - 1`` is unsafe when that token is an image code (the image would
    lose its tail or its closing ``<break>``) or an opening ``<break>`` followed by an image code.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    c = min(int(limit), tokens.size)
    if c >= tokens.size:
        return tokens.size
    while c > 0:
        last = tokens[c - 1]
        nxt = tokens[c]  # c < tokens.size here
        opening_break = last == vocab.boi and bool(vocab.is_image(nxt))
        if not bool(vocab.is_image(last)) and not opening_break:
            return c
        c -= 1
    return 0


def build_retrieval_prefix(
    docs: Sequence[np.ndarray], *, vocab: VocabManifest, max_len: int, separator: int | None = None
) -> np.ndarray:
    """Concatenate retrieved documents (rank order) with separators into at most ``max_len`` ids.

    ``docs``: token arrays of the retrieved documents, best first. ``separator`` defaults to
    ``vocab.eos`` (see the module docstring for the layout and the truncation rule).
    Returns an int64 array of length <= ``max_len`` (empty when nothing fits).
    """
    sep = vocab.eos if separator is None else int(separator)
    budget = int(max_len)
    parts: list[np.ndarray] = []
    for doc in docs:
        if budget < 2:  # one token of body + its separator is the least worth adding
            break
        body = _strip_specials(doc, vocab=vocab)
        if body.size == 0:
            continue
        if body.size + 1 <= budget:
            parts += [body, np.array([sep], dtype=np.int64)]
            budget -= body.size + 1
            continue
        cut = safe_cut(body, limit=budget - 1, vocab=vocab)
        if cut > 0:
            parts += [body[:cut], np.array([sep], dtype=np.int64)]
        break
    if not parts:
        return np.zeros(0, dtype=np.int64)
    out = np.concatenate(parts)
    assert out.size <= max_len
    return out


def prepend_retrieved(
    sequence: np.ndarray, docs: Sequence[np.ndarray], *, vocab: VocabManifest, context: int,
    separator: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``[bos] prefix main`` fitting ``context`` tokens; returns ``(tokens, is_prefix)``.

    The prefix gets whatever room ``sequence`` leaves (``context - len(sequence)``); a leading
    ``<bos>`` of ``sequence`` stays first. ``is_prefix`` (bool, same length) marks the retrieved
    tokens, for a host that down-weights or masks their loss (RA-CM3 weights them 0.1).
    """
    seq = np.asarray(sequence, dtype=np.int64).reshape(-1)
    prefix = build_retrieval_prefix(docs, vocab=vocab, max_len=max(0, context - seq.size),
                                    separator=separator)
    head = seq[:1] if seq.size and seq[0] == vocab.bos else seq[:0]
    rest = seq[head.size:]
    tokens = np.concatenate([head, prefix, rest])
    is_prefix = np.zeros(tokens.size, dtype=bool)
    is_prefix[head.size:head.size + prefix.size] = True
    return tokens, is_prefix

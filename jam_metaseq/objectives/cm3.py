"""The CM3 causally-masked objective (paper §3.1 "Objective"; CM3, Aghajanyan et al. 2022).

A sequence either stays as it is (plain causal LM) or becomes an infilling instance: ``n`` spans
are cut out, each replaced in place by ``<mask:i>`` (i in order of position), and at the end of the
sequence ``<mask:i> span_i <eoss>`` is appended for every span. The model is trained on the result
with the ordinary left-to-right loss -log p(x). JAM/CM3leon never mask across a modality
``<break>``: no span contains or crosses one.

Public API (other parts build against these names)::

    cm3_transform(tokens, rng, *, vocab, mode="poisson", lam=1.0, min_spans=1, max_spans=16,
                  max_len=None, return_loss_weights=False, loss_mask=None, num_spans=None,
                  sentinel_weight=0.0, cross_documents=False)
        -> np.ndarray int64 (L_out,)  or  (tokens, weights float32 (L_out,))
    cm3_inverse(tokens, *, vocab) -> np.ndarray int64
    CM3Config (dataclass) and CM3Config.apply(tokens, rng, *, vocab, loss_mask=None)
    item_rng(seed, epoch, index) -> np.random.Generator   (per-item stream for on-the-fly use)

Rules, stated once:
- Number of spans: ``poisson``: n ~ Poisson(lam) clamped to [min_spans, max_spans]; ``fixed``:
  n = num_spans (default min_spans) clamped likewise; ``fim``: exactly one span (fill in the middle).
  n is further reduced when the sequence has too few maskable tokens (each span needs 2).
- Span placement: 2n distinct positions are drawn uniformly among the maskable positions (and
  the end of the sequence) and sorted; span i = [p_2i, p_2i+1), cut short at the first barrier token after its start. So spans
  never overlap, never touch each other, have length >= 1 and never contain a barrier. Barriers:
  ``<break>`` and ``<pad>`` always; ``<eos>``/``<s>`` too unless ``cross_documents=True`` (spans do
  not cross document boundaries inside a packed block); with a vocabulary's conversation tokens,
  ``<user>``, ``<assistant>`` and ``<eot>`` (docs/CONVERSATIONS.md): a span lies inside one turn's
  content, so every turn keeps its role token and its closing ``<eot>`` in place (the layout the
  chat feeds and the ``<eot>`` it must learn to write where a turn ends), and no user token moves
  into an assistant turn or the other way.
- Length policy (``max_len``): the output is L + 3n long. When that exceeds max_len, the *input* is
  truncated to max_len - 3n tokens before the spans are drawn (policy "truncate"), so the appended
  spans always fit and the result stays invertible (to the truncated input). Binarizing with
  block_size <= max_positions - 3 * max_spans means nothing is ever cut.
- Loss weights (``return_loss_weights=True``): target-aligned, weights[t] is the weight of
  predicting out[t]. A moved token keeps its ``loss_mask`` value (all ones when no mask is given),
  both copies of ``<mask:i>`` get ``sentinel_weight`` (CM3 weighted them 0), ``<eoss>`` gets the
  mask value of the last token of its span. The trainer multiplies nothing else: pass the dataset's
  ``loss_mask`` in and use the returned weights.
- Determinism: the output depends only on the inputs and the state of ``rng``.
- The input must hold no sentinel or ``<eoss>`` token (else the result would not be invertible).

Everything is vectorised: the only Python loop runs over the <= max_spans spans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from jam_metaseq.vocab import VocabManifest

CM3Mode = Literal["poisson", "fixed", "fim"]
MODES = ("poisson", "fixed", "fim")


def _num_spans(
    rng: np.random.Generator, *, mode: str, lam: float, min_spans: int, max_spans: int,
    num_spans: int | None,
) -> int:
    if mode == "poisson":
        n = int(rng.poisson(lam))
    elif mode == "fixed":
        n = min_spans if num_spans is None else int(num_spans)
    elif mode == "fim":
        return 1
    else:
        raise ValueError(f"unknown CM3 mode {mode!r}; expected one of {MODES}")
    return min(max(n, min_spans), max_spans)


def _barrier_mask(tokens: np.ndarray, *, vocab: VocabManifest, cross_documents: bool) -> np.ndarray:
    barrier = vocab.is_frame(tokens) | (tokens == vocab.pad)
    if vocab.conversation_tokens:  # a span stays inside one turn's content
        barrier |= (tokens == vocab.user_id) | (tokens == vocab.assistant_id) | (tokens == vocab.eot)
    if not cross_documents:
        barrier |= (tokens == vocab.eos) | (tokens == vocab.bos)
    return barrier


def draw_spans(
    tokens: np.ndarray, rng: np.random.Generator, n: int, *, vocab: VocabManifest,
    cross_documents: bool = False,
) -> np.ndarray:
    """Draw up to ``n`` spans as an (n', 2) int64 array of [start, end) rows, sorted, n' <= n."""
    barrier = _barrier_mask(tokens, vocab=vocab, cross_documents=cross_documents)
    # candidate endpoints: the M maskable positions, plus L so the last token can be masked
    allowed = np.append(np.flatnonzero(~barrier), tokens.size)  # (M + 1,)
    n = min(n, allowed.size // 2)
    if n <= 0 or allowed.size < 2:
        return np.zeros((0, 2), dtype=np.int64)
    picks = np.sort(rng.choice(allowed.size, size=2 * n, replace=False))
    ends_at = allowed[picks].reshape(n, 2)  # (n, 2) sorted distinct positions
    starts = ends_at[:, 0]
    ends = ends_at[:, 1]
    barriers = np.flatnonzero(barrier)
    if barriers.size:
        # first barrier strictly after each start (start itself is never a barrier)
        k = np.searchsorted(barriers, starts, side="right")
        nxt = np.where(k < barriers.size, barriers[np.minimum(k, barriers.size - 1)], tokens.size)
        ends = np.minimum(ends, nxt)
    return np.stack([starts, ends], axis=1).astype(np.int64)


def apply_spans(
    tokens: np.ndarray, spans: np.ndarray, *, vocab: VocabManifest,
    weights: np.ndarray | None = None, sentinel_weight: float = 0.0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Move the given sorted, disjoint [start, end) spans to the end (the deterministic half)."""
    n = spans.shape[0]
    if n == 0:
        return tokens.copy(), (None if weights is None else weights.copy())
    if n > vocab.num_sentinels:
        raise ValueError(f"{n} spans but the vocabulary has only {vocab.num_sentinels} sentinels")
    L = tokens.size
    out = np.empty(L + 3 * n, dtype=np.int64)
    w_out = None if weights is None else np.empty(L + 3 * n, dtype=np.float32)
    # prefix: keep [prev_end, start_i), then <mask:i>
    pos = 0
    prev = 0
    for i in range(n):
        s, e = int(spans[i, 0]), int(spans[i, 1])
        k = s - prev
        out[pos:pos + k] = tokens[prev:s]
        if w_out is not None:
            w_out[pos:pos + k] = weights[prev:s]
            w_out[pos + k] = sentinel_weight
        out[pos + k] = vocab.sentinel_start + i
        pos += k + 1
        prev = e
    k = L - prev
    out[pos:pos + k] = tokens[prev:]
    if w_out is not None:
        w_out[pos:pos + k] = weights[prev:]
    pos += k
    # suffix: <mask:i> span_i <eoss>
    for i in range(n):
        s, e = int(spans[i, 0]), int(spans[i, 1])
        out[pos] = vocab.sentinel_start + i
        out[pos + 1:pos + 1 + e - s] = tokens[s:e]
        out[pos + 1 + e - s] = vocab.eoss
        if w_out is not None:
            w_out[pos] = sentinel_weight
            w_out[pos + 1:pos + 1 + e - s] = weights[s:e]
            w_out[pos + 1 + e - s] = weights[e - 1]
        pos += e - s + 2
    assert pos == out.size
    return out, w_out


def cm3_transform(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    vocab: VocabManifest,
    mode: str = "poisson",
    lam: float = 1.0,
    min_spans: int = 1,
    max_spans: int = 16,
    max_len: int | None = None,
    return_loss_weights: bool = False,
    loss_mask: np.ndarray | None = None,
    num_spans: int | None = None,
    sentinel_weight: float = 0.0,
    cross_documents: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """CM3-transform one sequence (rules in the module docstring).

    tokens: (L,) int ids; rng: the only source of randomness; loss_mask: optional (L,) bool that
    travels with the tokens (needs ``return_loss_weights=True``). Returns (L_out,) int64 ids, or
    ``(ids, weights)`` with float32 (L_out,) target-aligned loss weights.
    """
    if max_spans > vocab.num_sentinels:
        raise ValueError(f"max_spans={max_spans} exceeds the vocabulary's {vocab.num_sentinels} sentinels")
    if not 0 <= min_spans <= max_spans:
        raise ValueError(f"need 0 <= min_spans <= max_spans, got {min_spans}, {max_spans}")
    if loss_mask is not None and not return_loss_weights:
        raise ValueError("loss_mask is given but return_loss_weights=False: it would be lost")
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if (vocab.is_sentinel(tokens) | (tokens == vocab.eoss)).any():
        raise ValueError("input already holds CM3 sentinel or <eoss> tokens")
    weights = None
    if return_loss_weights:
        if loss_mask is None:
            weights = np.ones(tokens.size, dtype=np.float32)
        else:
            loss_mask = np.asarray(loss_mask)
            if loss_mask.shape != tokens.shape:
                raise ValueError(f"loss_mask shape {loss_mask.shape} != tokens shape {tokens.shape}")
            weights = loss_mask.astype(np.float32)

    n = _num_spans(rng, mode=mode, lam=lam, min_spans=min_spans, max_spans=max_spans,
                   num_spans=num_spans)
    if max_len is not None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        n = min(n, max(0, (max_len - 1) // 3))  # at least one input token survives
        keep = max_len - 3 * n
        if tokens.size > keep:  # policy "truncate": cut the input, then draw spans
            tokens = tokens[:keep]
            if weights is not None:
                weights = weights[:keep]
    spans = draw_spans(tokens, rng, n, vocab=vocab, cross_documents=cross_documents)
    out, w_out = apply_spans(tokens, spans, vocab=vocab, weights=weights,
                             sentinel_weight=sentinel_weight)
    if return_loss_weights:
        return out, w_out
    return out


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one dataset item: the same item in the same epoch is always masked the
    same way, whichever worker or resume point reads it; a new epoch draws new spans."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def cm3_inverse(tokens: np.ndarray, *, vocab: VocabManifest) -> np.ndarray:
    """Undo ``cm3_transform`` (untruncated output): put every span back in place of its sentinel."""
    tokens = np.asarray(tokens, dtype=np.int64)
    sent_pos = np.flatnonzero(vocab.is_sentinel(tokens))
    if sent_pos.size == 0:
        return tokens.copy()
    if sent_pos.size % 2:
        raise ValueError(f"odd number of sentinels ({sent_pos.size}): not a CM3 sequence")
    n = sent_pos.size // 2
    inplace, moved = sent_pos[:n], sent_pos[n:]
    expected = vocab.sentinel_start + np.arange(n)
    if not (np.array_equal(tokens[inplace], expected) and np.array_equal(tokens[moved], expected)):
        raise ValueError("sentinels are not <mask:0..n-1> twice in order")
    eoss_pos = np.flatnonzero(tokens == vocab.eoss)
    if eoss_pos.size != n or eoss_pos[-1] != tokens.size - 1:
        raise ValueError(f"expected {n} <eoss> tokens closing the appended spans")
    if not np.all((eoss_pos > moved) & (np.append(moved[1:], tokens.size) > eoss_pos)):
        raise ValueError("appended spans are not <mask:i> span <eoss>")
    pieces = []
    prev = 0
    for i in range(n):
        pieces.append(tokens[prev:inplace[i]])
        pieces.append(tokens[moved[i] + 1:eoss_pos[i]])
        prev = inplace[i] + 1
    pieces.append(tokens[prev:moved[0]])
    return np.concatenate(pieces)


@dataclass
class CM3Config:
    """Options of the CM3 transform, as the task and the trainer carry them."""

    mode: str = "poisson"
    """How many spans: ``poisson`` (Poisson(lam) clamped), ``fixed`` (num_spans), ``fim`` (one)."""
    lam: float = 1.0
    """Poisson rate of the number of spans."""
    min_spans: int = 1
    """Lower clamp (CM3 paper: 1; metaseq main: 0, allowing plain LM samples)."""
    max_spans: int = 16
    """Upper clamp; must not exceed the vocabulary's sentinels."""
    num_spans: int | None = None
    """Span count of mode ``fixed`` (None = min_spans)."""
    max_len: int | None = None
    """Longest output; longer inputs are truncated before spans are drawn."""
    sentinel_weight: float = 0.0
    """Loss weight of predicting a sentinel (CM3 used 0)."""
    cross_documents: bool = False
    """Let spans cross <eos>/<s> document boundaries inside a packed block."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown CM3 mode {self.mode!r}; expected one of {MODES}")
        if not 0 <= self.min_spans <= self.max_spans:
            raise ValueError(f"need 0 <= min_spans <= max_spans, got {self.min_spans}, {self.max_spans}")

    def apply(
        self, tokens: np.ndarray, rng: np.random.Generator, *, vocab: VocabManifest,
        loss_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Transform one item; returns (ids int64, target-aligned weights float32)."""
        return cm3_transform(  # type: ignore[return-value]
            tokens, rng, vocab=vocab, mode=self.mode, lam=self.lam, min_spans=self.min_spans,
            max_spans=self.max_spans, max_len=self.max_len, return_loss_weights=True,
            loss_mask=loss_mask, num_spans=self.num_spans, sentinel_weight=self.sentinel_weight,
            cross_documents=self.cross_documents,
        )

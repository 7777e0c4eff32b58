"""The evaluation rule: in which context a document is scored (paper §3.2, Tables 1-5). One home,
called by ``jam-eval ppl``, the lm-eval adapter, ``jam run`` and ``jam quickstart`` (all through
``document_windows``).

How training presents a document
    ``jam-data binarize`` ends every document with ``<eos>`` and packs documents end to end into
    blocks of T + 1 tokens (``data/packing.py``). With ``break_mode="complete"`` (the default, and
    ``jam run``'s) a block holds whole documents, so every block starts with a document's first
    token at position 0; with ``eos`` every document is a block of its own. The training task
    (``task/items.py``, both hosts) shifts a block by one: input t predicts t + 1, so a block's
    first token is context and never a target. No block starts with ``<eos>``: the model never sees
    ``<eos>`` at position 0. A document after the first one of a block also sees the documents
    packed before it (its first token is predicted after the previous document's ``<eos>``).

The rule
    A document is scored alone, from position 0, with nothing before it: the context training gives
    every document that starts a block (every document when packed with ``eos``). Its first token
    is context; every later token is a target predicted from the tokens before it. What was packed
    before a document in training depends on its neighbours; scoring each document alone does not.
    Measured on the quickstart's trained parents (docs/REPRODUCTION.md, "The evaluation rule"):
    on the same targets, alone = 1.757 (text) / 4.085 (captions), in the packed validation blocks
    the trainer scores = 1.767 / 4.331, after an ``<eos>`` put at position 0 = 6.588 / 4.767 (the
    rule jam-eval and the lm-eval adapter followed before: a context training never gives).

Long documents
    Let ``x`` be the document and number its targets ``t = 0 .. N-1`` (target t is ``x[t+1]``,
    predicted from ``x[:t+1]``); only targets from ``first_target - 1`` on are scored (default:
    all). They are cut into consecutive chunks of ``stride`` targets (``stride <= max_len``,
    default ``max_len``); the chunk ``[a, b)`` is scored with the input window
    ``x[max(0, b - max_len) : b]``: the model sees at most ``max_len`` tokens, positions restart
    at every window, and each target is predicted exactly once. With ``stride = max_len`` windows do
    not overlap (the last one reaches back to a full ``max_len`` of context); a smaller stride gives
    every target at least ``max_len - stride`` tokens of context. A document of at most
    ``max_len + 1`` tokens is one window, exactly its training item.

Public API::

    document_windows(tokens, *, max_len, stride=None, first_target=1, seq=0) -> list[Window]
    Window(inputs, targets, seq, start)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Window:
    """One forward pass: ``inputs`` (L,) and the last ``num_scored`` positions' next-token targets."""

    inputs: list[int]
    """Input ids, at most ``max_len`` of them."""
    targets: list[int]
    """Targets of the scored positions (len = num_scored): ``targets[j]`` follows input position
    ``len(inputs) - num_scored + j``."""
    seq: int = 0
    """Which document the window belongs to."""
    start: int = 0
    """Index (into the document's targets) of the first scored target: token ``start + 1``."""

    @property
    def num_scored(self) -> int:
        return len(self.targets)


def document_windows(tokens: Sequence[int], *, max_len: int, stride: int | None = None, first_target: int = 1,
                     seq: int = 0) -> list[Window]:
    """The scoring windows of one document under the evaluation rule (module docstring): nothing
    before it, token i (``i >= first_target >= 1``) predicted from ``tokens[:i]`` (the last
    ``max_len`` of them). ``first_target`` > 1 scores only the tokens from there on (the lm-eval
    adapter: a continuation after its context)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    stride = max_len if stride is None else stride
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in [1, max_len={max_len}], got {stride}")
    if first_target < 1:
        raise ValueError(f"first_target must be >= 1 (a document's first token has no context), got {first_target}")
    x = [int(t) for t in tokens]
    n_targets = len(x) - 1
    out = []
    for a in range(first_target - 1, max(n_targets, 0), stride):
        b = min(a + stride, n_targets)
        lo = max(0, b - max_len)
        out.append(Window(inputs=x[lo:b], targets=x[a + 1 : b + 1], seq=seq, start=a))
    return out


__all__ = ["Window", "document_windows"]

"""Real English text that ships with Python, split into training and held-out documents (issue 28
item 3: "held-out English text that ships with a package or with Python (no download)").

The source is ``pydoc_data.topics.topics``: the Python Language Reference's topics as ``help()``
prints them (79 topics, about 465,000 characters of English prose with some grammar and code, in
CPython 3.11), part of every CPython installation.

Documents: each topic is cut at blank lines into chunks of whole paragraphs of at most
``max_chars`` characters (a paragraph longer than that is a chunk of its own). Split: by topic, so
no held-out paragraph has a neighbour in training: a topic is held out when the first 8 hex digits
of ``sha256(topic name)``, read as an integer, modulo 100 fall below ``held_out_percent``. The rule
depends on the topic's name only, so it is the same on every machine and stays the same when a
Python version adds or drops topics.

Public API::

    topic_documents(*, max_chars=2000) -> dict[str, list[str]]      # topic -> its chunks, in order
    is_held_out(topic, *, held_out_percent=15) -> bool
    shipped_text_split(*, held_out_percent=15, max_chars=2000) -> TextSplit
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

SOURCE = "pydoc_data.topics (the Python Language Reference topics shipped with CPython)"


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return dict(topics)


def _chunks(text: str, max_chars: int) -> list[str]:
    paragraphs = [p.strip("\n") for p in text.split("\n\n")]
    out: list[str] = []
    cur = ""
    for p in paragraphs:
        if not p.strip():
            continue
        if cur and len(cur) + 2 + len(p) > max_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{p}" if cur else p
    if cur:
        out.append(cur)
    return out


def topic_documents(*, max_chars: int = 2000) -> dict[str, list[str]]:
    """Every topic (sorted by name) as its chunks of whole paragraphs of <= ``max_chars``."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    return {name: _chunks(text, max_chars) for name, text in sorted(_topics().items())}


def is_held_out(topic: str, *, held_out_percent: int = 15) -> bool:
    """The split rule (module docstring): ``int(sha256(topic)[:8], 16) % 100 < held_out_percent``."""
    if not 0 <= held_out_percent <= 100:
        raise ValueError(f"held_out_percent must be in [0, 100], got {held_out_percent}")
    return int(hashlib.sha256(topic.encode("utf-8")).hexdigest()[:8], 16) % 100 < held_out_percent


@dataclass(frozen=True)
class TextSplit:
    """Training and held-out documents (lists of strings) and the topics of each."""

    train: list[str]
    valid: list[str]
    train_topics: list[str]
    valid_topics: list[str]
    source: str = SOURCE

    def valid_bytes(self, limit: int | None = None) -> int:
        """UTF-8 bytes of the first ``limit`` held-out documents (all when None): the denominator of
        bits per byte."""
        return sum(len(d.encode("utf-8")) for d in self.valid[:limit])


def shipped_text_split(*, held_out_percent: int = 15, max_chars: int = 2000) -> TextSplit:
    """Training and held-out documents of ``pydoc_data.topics`` by the topic rule (module docstring)."""
    docs = topic_documents(max_chars=max_chars)
    held = [t for t in docs if is_held_out(t, held_out_percent=held_out_percent)]
    kept = [t for t in docs if t not in set(held)]
    return TextSplit(train=[c for t in kept for c in docs[t]], valid=[c for t in held for c in docs[t]],
                     train_topics=kept, valid_topics=held)


__all__ = ["SOURCE", "TextSplit", "is_held_out", "shipped_text_split", "topic_documents"]

"""The structured answer of mixed-modal generation: text segments and image code grids (§3.1).

An answer is the generated token ids split at ``<break>`` frames: ``<break> img_0 .. img_{N-1}
<break>`` becomes an ``ImageSegment`` holding the (h, w) grid of VQ codes (code = id -
image_start); every other run becomes a ``TextSegment`` of text-tokenizer ids (id - text_start).
Pure data, JSON round-trippable; rendering lives in ``render.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence, Union

from jam_metaseq.vocab import VocabManifest


@dataclass
class TextSegment:
    """A run of text."""

    ids: list[int]
    """Text-tokenizer ids (vocabulary id - text_start)."""
    text: str | None = None
    """Decoded text, when a tokenizer was given."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "text", "ids": self.ids}
        if self.text is not None:
            d["text"] = self.text
        return d


@dataclass
class ImageSegment:
    """One image as its VQ code grid."""

    codes: list[list[int]]
    """(h, w) grid of codes in [0, image_codes)."""
    complete: bool = True
    """False when the answer stopped inside the image (length limit)."""
    png: str | None = None
    """Path of the decoded PNG, when an image decoder was configured."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "image", "codes": self.codes, "complete": self.complete}
        if self.png is not None:
            d["png"] = self.png
        return d


Segment = Union[TextSegment, ImageSegment]


@dataclass
class Answer:
    """One prompt's generated answer."""

    prompt_ids: list[int]
    """The prompt as vocabulary ids."""
    ids: list[int]
    """Generated vocabulary ids (``<eos>`` included when it was sampled)."""
    finish_reason: str
    """``eos`` or ``length``."""
    seed: int
    """Seed of this row's random stream."""
    segments: list[Segment] = field(default_factory=list)
    """``ids`` split into text runs and images."""
    prompt: str | None = None
    """The prompt text, when known."""

    @property
    def images(self) -> list[ImageSegment]:
        return [s for s in self.segments if isinstance(s, ImageSegment)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt, "prompt_ids": self.prompt_ids, "ids": self.ids,
            "finish_reason": self.finish_reason, "seed": self.seed,
            "segments": [s.to_dict() for s in self.segments],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Answer":
        segs: list[Segment] = []
        for s in d.get("segments", []):
            if s["type"] == "text":
                segs.append(TextSegment(ids=list(s["ids"]), text=s.get("text")))
            elif s["type"] == "image":
                segs.append(ImageSegment(codes=s["codes"], complete=s.get("complete", True), png=s.get("png")))
            else:
                raise ValueError(f"unknown segment type {s['type']!r}")
        return cls(
            prompt_ids=list(d["prompt_ids"]), ids=list(d["ids"]), finish_reason=d["finish_reason"],
            seed=int(d["seed"]), segments=segs, prompt=d.get("prompt"),
        )


def open_image_codes(prompt_ids: Sequence[int], *, vocab: VocabManifest) -> list[int] | None:
    """Codes of an image the prompt leaves open (odd number of ``<break>``; more image begins than
    ends), else None."""
    breaks = [i for i, t in enumerate(prompt_ids) if int(t) == vocab.boi]
    ends = len(breaks) // 2 if vocab.eoi == vocab.boi else sum(int(t) == vocab.eoi for t in prompt_ids)
    if len(breaks) == (2 * ends if vocab.eoi == vocab.boi else ends):
        return None
    return [int(vocab.image_code(int(t))) for t in prompt_ids[breaks[-1] + 1 :] if vocab.is_image(int(t))]


def split_segments(
    ids: Sequence[int], *, vocab: VocabManifest, open_image: Sequence[int] | None = None
) -> list[Segment]:
    """Generated ids -> segments.

    ``open_image``: codes of an image the prompt left open (``open_image_codes``); generation then
    starts inside that image. Specials other than ``<break>`` (eos, pad, sentinels) are dropped
    from text segments; an image cut by the length limit is padded with -1 and marked incomplete.
    """
    h, w = vocab.image_grid
    n = vocab.image_tokens_per_image
    segs: list[Segment] = []
    text: list[int] = []
    image: list[int] | None = None if open_image is None else list(open_image)

    def flush_image(codes: list[int]) -> None:
        complete = len(codes) == n
        codes = (codes + [-1] * n)[:n]
        segs.append(ImageSegment(codes=[codes[r * w : (r + 1) * w] for r in range(h)], complete=complete))

    for t in ids:
        t = int(t)
        if image is not None:
            if t == vocab.eoi:
                flush_image(image)
                image = None
            elif vocab.is_image(t):
                image.append(int(vocab.image_code(t)))
            continue
        if t == vocab.boi:
            if text:
                segs.append(TextSegment(ids=text))
                text = []
            image = []
        elif vocab.is_text(t):
            text.append(t - vocab.text_start)
    if text:
        segs.append(TextSegment(ids=text))
    if image is not None:
        flush_image(image)
    return segs

"""The embedded dataset of ``jam quickstart``: made on the fly, nothing downloaded (paper §3.1.1 in
miniature).

Two procedural sources stand in for the paper's two kinds of continued-pretraining data:

- **image-caption documents** (the Shutterstock / MS-COCO role): one coloured shape (circle, square
  or triangle of a named colour on a plain background, ``image_tokenizer.synthetic``) with a
  caption naming all three ("a red circle on a white background"). Training documents put the
  caption first, then the image; a fraction add a sentence after the image ("the circle is red."),
  so the model also sees text after an image (what an interleaved answer needs). Validation
  documents are caption + image only: their perplexity is the miniature "MS-COCO PPL".
- **instruction documents** (the LIMA / wikiHow role, optional): "draw a red circle on a white
  background." answered by a sentence, the picture and a follow-up sentence.
- **a text corpus** (the Wikipedia / CommonCrawl role): short documents of templated sentences on
  other topics (towns, trades, weather, animals, numbers) with consistent associations (a baker
  bakes bread, a fisher catches fish), so a language model can learn something in a few hundred
  updates, and sentences about pictures that use every caption word without being captions ("in
  the picture the square is orange and the background is white."), as a web corpus would: JAM-Cross
  reads captions through the LLM's text embedding rows (docs/REPRODUCTION.md). Its validation
  perplexity is the miniature "Wikipedia PPL".

Everything is a pure function of a seed. Documents use the JSONL format of
``jam_metaseq.data.documents``: ``{"segments": [{"text": ...}, {"image_tokens": [...]}, ...]}``.

Public API::

    text_documents(n, *, seed) -> list[dict]             # {"segments": [{"text": str}]}
    caption_samples(n, *, size, seed, follow_up=0.3) -> list[CaptionSample]
    caption_document(*, caption, codes=None | image=None, follow_up=None) -> dict
    instruct_samples(n, *, size, seed) -> list[CaptionSample]   # prompt in .caption
    instruct_document(sample, *, image) -> dict          # {"prompt", "response": [text, image, text]}
    write_jsonl(path, docs)                              # atomic
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from jam_metaseq.image_tokenizer.synthetic import BACKGROUNDS, COLOURS, SHAPES, shape_samples

# ---- the text corpus ---------------------------------------------------------------------------
TOWNS = ("paris", "lisbon", "oslo", "cairo", "lima", "tokyo", "dublin", "quito")
TRADES = {  # trade -> (verb, object, place)
    "baker": ("bakes", "bread", "bakery"),
    "fisher": ("catches", "fish", "harbour"),
    "farmer": ("grows", "wheat", "field"),
    "teacher": ("teaches", "history", "school"),
    "doctor": ("helps", "patients", "hospital"),
    "painter": ("paints", "portraits", "studio"),
    "tailor": ("sews", "coats", "shop"),
    "miner": ("digs", "coal", "mine"),
}
WEATHER = {"spring": "mild", "summer": "hot", "autumn": "windy", "winter": "cold"}
ANIMALS = {"cat": "sleeps", "dog": "barks", "horse": "runs", "owl": "hoots", "bee": "buzzes", "frog": "jumps"}
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _pick(rng: np.random.Generator, seq: Sequence[str]) -> str:
    return seq[int(rng.integers(len(seq)))]


def _sentence(rng: np.random.Generator) -> str:
    kind = int(rng.integers(6))
    if kind == 5:  # what pictures show: the words of the captions, in sentences that are not captions
        shape, colour = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
        background = _pick(rng, list(BACKGROUNDS))
        if rng.random() < 0.5:
            return f"the {_pick(rng, TOWNS)} museum shows a picture of a {colour} {shape} on a {background} background."
        return f"in the picture the {shape} is {colour} and the background is {background}."
    if kind == 0:
        trade = _pick(rng, list(TRADES))
        verb, obj, place = TRADES[trade]
        return f"the {trade} in {_pick(rng, TOWNS)} {verb} {obj} at the {place}."
    if kind == 1:
        season = _pick(rng, list(WEATHER))
        return f"in {season} the weather in {_pick(rng, TOWNS)} is {WEATHER[season]}."
    if kind == 2:
        animal = _pick(rng, list(ANIMALS))
        return f"every {_pick(rng, DAYS)} the {animal} {ANIMALS[animal]} near the river."
    if kind == 3:
        i = int(rng.integers(len(NUMBERS) - 1))
        return f"{NUMBERS[i]} comes before {NUMBERS[i + 1]}."
    trade = _pick(rng, list(TRADES))
    verb, obj, _ = TRADES[trade]
    n = _pick(rng, NUMBERS[1:])
    return f"on {_pick(rng, DAYS)} a {trade} {verb} {n} kinds of {obj}."


def text_documents(n: int, *, seed: int, sentences: tuple[int, int] = (3, 6)) -> list[dict]:
    """``n`` text-only documents of ``sentences`` (min, max inclusive) templated sentences each."""
    rng = np.random.default_rng([seed, 0x7E47])
    lo, hi = sentences
    return [{"segments": [{"text": " ".join(_sentence(rng) for _ in range(int(rng.integers(lo, hi + 1))))}]}
            for _ in range(n)]


# ---- image-caption documents -------------------------------------------------------------------
CAPTION_TEMPLATES = (
    "a {colour} {shape} on a {background} background",
    "a picture of a {colour} {shape} on a {background} background",
    "{colour} {shape}, {background} background",
)


@dataclass(frozen=True)
class CaptionSample:
    """One image with the words of its document (the image itself is tokenised later)."""

    image: Image.Image
    caption: str
    follow_up: str | None
    """A sentence after the image, or None (caption + image only)."""
    shape: str
    colour: str
    background: str


def caption_samples(n: int, *, size: int, seed: int, follow_up: float = 0.3,
                    templates: Sequence[str] = CAPTION_TEMPLATES) -> list[CaptionSample]:
    """``n`` shape images of ``size`` px with captions; a ``follow_up`` fraction get a sentence
    after the image. Same seed, same samples."""
    rng = np.random.default_rng([seed, 0xCA9])
    out = []
    for s in shape_samples(n, size=size, seed=int(rng.integers(2**31))):
        tpl = templates[int(rng.integers(len(templates)))]
        caption = tpl.format(colour=s.colour, shape=s.shape, background=s.background)
        after = None
        if rng.random() < follow_up:
            after = f"the {s.shape} is {s.colour} and the background is {s.background}."
        out.append(CaptionSample(image=s.image, caption=caption, follow_up=after, shape=s.shape,
                                 colour=s.colour, background=s.background))
    return out


def caption_document(*, caption: str, codes: np.ndarray | Sequence[int] | None = None, image: str | None = None,
                     follow_up: str | None = None) -> dict:
    """The JSONL document: ``caption``, the image as ``codes`` (any shape, flattened row-major) or as
    an ``image`` file path (relative to the JSONL file's folder), then ``follow_up`` when given."""
    if (codes is None) == (image is None):
        raise ValueError("give the image as codes or as a file path, not both or neither")
    seg = {"image": image} if image is not None else {"image_tokens": [int(c) for c in np.asarray(codes).reshape(-1)]}
    segs: list[dict] = [{"text": caption}, seg]
    if follow_up:
        segs.append({"text": follow_up})
    return {"segments": segs}


INSTRUCT_TEMPLATES = ("draw a {colour} {shape} on a {background} background.",
                      "show me a {colour} {shape} on a {background} background.",
                      "can you paint a {colour} {shape}? the background should be {background}.")


def instruct_samples(n: int, *, size: int, seed: int) -> list[CaptionSample]:
    """``n`` instruction samples: the request in ``caption``, the answer's closing sentence in
    ``follow_up`` (always given)."""
    rng = np.random.default_rng([seed, 0x1257])
    out = []
    for s in shape_samples(n, size=size, seed=int(rng.integers(2**31))):
        tpl = INSTRUCT_TEMPLATES[int(rng.integers(len(INSTRUCT_TEMPLATES)))]
        out.append(CaptionSample(image=s.image, caption=tpl.format(colour=s.colour, shape=s.shape,
                                                                   background=s.background),
                                 follow_up=f"the {s.shape} is {s.colour} and the background is {s.background}.",
                                 shape=s.shape, colour=s.colour, background=s.background))
    return out


def instruct_document(sample: CaptionSample, *, image: str) -> dict:
    """``{"prompt": request, "response": [sentence, image, follow-up]}`` (loss on the response only)."""
    return {"prompt": sample.caption + "\n\n",
            "response": [{"text": f"here is a {sample.colour} {sample.shape}."}, {"image": image},
                         {"text": sample.follow_up}]}


def write_jsonl(path: str | os.PathLike, docs: Iterable[dict]) -> Path:
    """One JSON document per line, written atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


__all__ = [
    "CAPTION_TEMPLATES", "CaptionSample", "INSTRUCT_TEMPLATES", "caption_document", "caption_samples",
    "instruct_document", "instruct_samples", "read_jsonl", "text_documents", "write_jsonl",
]

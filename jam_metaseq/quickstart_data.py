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
- **conversations** (multi-turn instruction data, issue 25; ``{"turns": [...]}``, docs/CONVERSATIONS.md):
  a first exchange (a drawing request answered with the picture, or a picture the user sends and
  the assistant describes), then one or two follow-ups that only the history answers: "now make it
  blue." (the same shape at the same place, in blue), "now put it on a black background.", "what
  colour was the background?", "what shape did you draw?", "what colour is it now?". Held-out sets
  are the same generator with another seed; ``drawing_prompts`` are the requests whose picture the
  prompt-following score reads (``jam_metaseq.eval.drawing``), single-turn or as a follow-up.
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
    conversation_samples(n, *, size, seed) -> list[ConversationSample]
    conversation_document(sample, *, images) -> dict     # {"turns": [...]}, images as paths or codes
    drawing_prompts(n, *, size, seed, follow_up) -> list[ConversationSample]  # ends with the request
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

from jam_metaseq.image_tokenizer.synthetic import BACKGROUNDS, COLOURS, SHAPES, make_shape_image, shape_samples

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


# ---- conversations (issue 25) -------------------------------------------------------------------
@dataclass(frozen=True)
class Picture:
    """A generated picture and what it shows (the prompt-following score's target)."""

    image: Image.Image
    shape: str
    colour: str
    background: str


@dataclass(frozen=True)
class ConversationSample:
    """Turns of (role, parts); a part is a sentence (str) or a ``Picture``."""

    turns: tuple[tuple[str, tuple], ...]
    kind: str
    """What the follow-ups ask: ``recolour``, ``background``, ``ask_background``, ``ask_shape``,
    ``ask_colour`` (after ``describe`` when the user sent the first picture), joined by ``+``."""

    @property
    def pictures(self) -> list[Picture]:
        return [p for _, parts in self.turns for p in parts if isinstance(p, Picture)]

    @property
    def target(self) -> Picture | None:
        """The picture the last assistant turn draws (None when it answers in words)."""
        last = [p for p in self.turns[-1][1] if isinstance(p, Picture)] if self.turns[-1][0] == "assistant" else []
        return last[-1] if last else None


FOLLOW_UPS = ("recolour", "background", "ask_background", "ask_shape", "ask_colour")
"""The follow-up questions; the first two ask for a new picture, the rest for words."""


def _picture(shape: str, colour: str, background: str, *, size: int, place: int) -> Picture:
    """``place`` seeds the shape's position and scale, so a redrawn picture keeps them."""
    img = make_shape_image(shape, colour, size=size, rng=np.random.default_rng(place), background=background)
    return Picture(image=img, shape=shape, colour=colour, background=background)


def _follow_up(kind: str, cur: Picture, rng: np.random.Generator, *, size: int, place: int
               ) -> tuple[tuple[str, tuple], tuple[str, tuple], Picture]:
    """(user turn, assistant turn, the picture the conversation is now about)."""
    if kind == "recolour":
        colour = _pick(rng, [c for c in COLOURS if c != cur.colour])
        new = _picture(cur.shape, colour, cur.background, size=size, place=place)
        return ("user", (f"now make it {colour}.",)), ("assistant", (f"here it is in {colour}.", new)), new
    if kind == "background":
        background = _pick(rng, [b for b in BACKGROUNDS if b != cur.background])
        new = _picture(cur.shape, cur.colour, background, size=size, place=place)
        return (("user", (f"now put it on a {background} background.",)),
                ("assistant", (f"here it is on a {background} background.", new)), new)
    if kind == "ask_background":
        return ("user", ("what colour was the background?",)), ("assistant", (f"the background was {cur.background}.",)), cur
    if kind == "ask_shape":
        return ("user", ("what shape was it?",)), ("assistant", (f"it was a {cur.shape}.",)), cur
    return ("user", (f"what colour is the {cur.shape} now?",)), ("assistant", (f"the {cur.shape} is {cur.colour}.",)), cur


def _first_exchange(rng: np.random.Generator, *, size: int, place: int, describe: bool
                    ) -> tuple[list[tuple[str, tuple]], Picture]:
    shape, colour = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
    background = _pick(rng, list(BACKGROUNDS))
    pic = _picture(shape, colour, background, size=size, place=place)
    if describe:  # the user sends the picture
        return [("user", (pic, "what is in this picture?")),
                ("assistant", (f"a {colour} {shape} on a {background} background.",))], pic
    tpl = INSTRUCT_TEMPLATES[int(rng.integers(len(INSTRUCT_TEMPLATES)))]
    return [("user", (tpl.format(colour=colour, shape=shape, background=background),)),
            ("assistant", (f"here is a {colour} {shape}.", pic))], pic


def conversation_samples(n: int, *, size: int, seed: int, describe: float = 0.25, third: float = 0.5
                         ) -> list[ConversationSample]:
    """``n`` conversations: a first exchange (a ``describe`` fraction start with the user's picture),
    one follow-up, and a second one for a ``third`` fraction. Same seed, same conversations."""
    rng = np.random.default_rng([seed, 0xC0417])
    out = []
    for _ in range(n):
        place = int(rng.integers(2**31))
        turns, cur = _first_exchange(rng, size=size, place=place, describe=bool(rng.random() < describe))
        kinds = ["describe"] if turns[0][1] and isinstance(turns[0][1][0], Picture) else []
        for _ in range(1 + int(rng.random() < third)):
            kind = _pick(rng, FOLLOW_UPS)
            user, assistant, cur = _follow_up(kind, cur, rng, size=size, place=place)
            turns += [user, assistant]
            kinds.append(kind)
        out.append(ConversationSample(turns=tuple(turns), kind="+".join(kinds)))
    return out


def drawing_prompts(n: int, *, size: int, seed: int, follow_up: bool) -> list[ConversationSample]:
    """Requests whose answer is one picture, ending with the assistant's expected answer (its
    ``target``): single-turn ("draw a red circle on a white background.") or, with ``follow_up``,
    a first exchange and then "now make it blue." / "now put it on a black background."."""
    rng = np.random.default_rng([seed, 0xD4A3])
    out = []
    for _ in range(n):
        place = int(rng.integers(2**31))
        turns, cur = _first_exchange(rng, size=size, place=place, describe=False)
        kind = "single"
        if follow_up:
            kind = _pick(rng, FOLLOW_UPS[:2])
            user, assistant, cur = _follow_up(kind, cur, rng, size=size, place=place)
            turns += [user, assistant]
        out.append(ConversationSample(turns=tuple(turns), kind=kind))
    return out


def conversation_document(sample: ConversationSample, *, images: Sequence[str | np.ndarray | Sequence[int]]) -> dict:
    """The JSONL document ``{"turns": [...]}``; ``images``: one per ``sample.pictures``, in order,
    as a file path (relative to the JSONL file's folder) or its codes."""
    pictures = iter(images)
    turns = []
    for role, parts in sample.turns:
        segs = []
        for part in parts:
            if isinstance(part, Picture):
                ref = next(pictures)
                segs.append({"image": ref} if isinstance(ref, str) else
                            {"image_tokens": [int(c) for c in np.asarray(ref).reshape(-1)]})
            else:
                segs.append({"text": part})
        turns.append({"role": role, "segments": segs})
    if next(pictures, None) is not None:
        raise ValueError(f"more images given than the {len(sample.pictures)} pictures of the conversation")
    return {"turns": turns, "kind": sample.kind}


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
    "CAPTION_TEMPLATES", "CaptionSample", "ConversationSample", "FOLLOW_UPS", "INSTRUCT_TEMPLATES", "Picture",
    "caption_document", "caption_samples", "conversation_document", "conversation_samples", "drawing_prompts",
    "instruct_document", "instruct_samples", "read_jsonl", "text_documents", "write_jsonl",
]

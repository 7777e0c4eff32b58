"""Per-row mixed-modal decoding state on token ids (paper §3.1 "Decoding Strategies").

The model writes text until it samples ``<break>``; then exactly ``image_tokens`` image codes
follow (only image codes allowed), a ``<break>`` is forced to close the image, and text resumes
until ``<eos>`` or the length limit. Where a vocabulary frames images with two ids (Chameleon: begin
``<racm3:break>``, end ``<eoss>``; ``VocabManifest.boi`` / ``eoi``), the begin id opens and the end
id is forced to close; text then never draws an image id or a frame id. This module knows ids only (``MixedModalRules``), never a
tokenizer, and keeps every row's state in (B,) tensors so a decode step needs no host sync:

    TEXT  --<break>-->  IMAGE (image_tokens codes)  -->  CLOSE (forced <break>)  -->  TEXT
    TEXT  --<eos> or length limit-->  DONE (forced <pad> from then on)

Limits: at most ``max_images`` images per answer; ``<eos>`` is forbidden until ``min_images``
images are written, and owed images are forced as late as they still fit; ``<break>`` is only allowed while a whole image (``image_tokens + 2``) still
fits, so an answer never holds a truncated image; ``force_image_first`` opens an image at once
(text-to-image); ``max_images=0`` forbids images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from jam_metaseq.vocab import VocabManifest

TEXT, IMAGE, CLOSE, DONE = 0, 1, 2, 3
MODE_NAMES = {TEXT: "text", IMAGE: "image", CLOSE: "close", DONE: "done"}


@dataclass(frozen=True)
class MixedModalRules:
    """Ids and limits the state machine enforces."""

    vocab_size: int
    """Logit width (model embedding rows, filler rows included)."""
    text_start: int
    """First text id."""
    text_end: int
    """One past the last text id."""
    image_start: int
    """First image-code id."""
    image_end: int
    """One past the last image-code id."""
    break_id: int
    """``<break>``: opens every image (``VocabManifest.boi``), and closes it unless ``eoi``."""
    eos: int
    """End of answer."""
    pad: int
    """Fed to finished rows (masked as a key by the model, positions do not advance)."""
    image_tokens: int = 1024
    """Image codes per image (VQ grid h * w)."""
    max_new_tokens: int = 256
    """Generated tokens per answer, images included."""
    max_images: int = 3
    """Images per answer (the paper keeps <= 3 per sample); 0 forbids images."""
    min_images: int = 0
    """``<eos>`` is forbidden until this many images were written (when one still fits)."""
    force_image_first: bool = False
    """Open an image right after the prompt (text-to-image)."""
    eoi: int | None = None
    """The id closing an image when it is not ``break_id`` (``VocabManifest.eoi``); None: ``<break>``."""
    text_holes: tuple[int, ...] = ()
    """Ids inside [text_start, text_end) that are not text and never drawn as text (an imported
    tokenizer's specials and the reserved ids serving as CM3 sentinels: ``VocabManifest.is_text``)."""

    @property
    def close_id(self) -> int:
        """The id forced after an image's last code."""
        return self.break_id if self.eoi is None else self.eoi

    @classmethod
    def from_vocab(cls, vocab: VocabManifest, *, vocab_size: int | None = None, **limits) -> "MixedModalRules":
        ids = np.arange(vocab.text_start, vocab.text_end)
        holes = ids[~np.asarray(vocab.is_text(ids), dtype=bool) & ~np.asarray(vocab.is_image(ids), dtype=bool)]
        return cls(
            vocab_size=vocab_size or vocab.size, text_start=vocab.text_start, text_end=vocab.text_end,
            image_start=vocab.image_start, image_end=vocab.image_end, break_id=vocab.boi,
            eos=vocab.eos, pad=vocab.pad, eoi=None if vocab.eoi == vocab.boi else vocab.eoi,
            text_holes=tuple(int(i) for i in holes),
            **{"image_tokens": vocab.image_tokens_per_image, **limits},
        )

    def __post_init__(self) -> None:
        if self.min_images > self.max_images:
            raise ValueError(f"min_images {self.min_images} > max_images {self.max_images}")
        if self.image_tokens < 1:
            raise ValueError(f"image_tokens must be >= 1, got {self.image_tokens}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def scan_prompt(prompt: Sequence[int], rules: MixedModalRules) -> tuple[int, int]:
    """(mode, image tokens already written) after ``prompt``: an odd number of ``<break>`` (more
    begins than ends) leaves an image open (e.g. a text-to-image prompt ending in ``<break>``)."""
    breaks = [i for i, t in enumerate(prompt) if t == rules.break_id]
    ends = len(breaks) // 2 if rules.eoi is None else sum(1 for t in prompt if t == rules.eoi)
    if len(breaks) == (2 * ends if rules.eoi is None else ends):
        return TEXT, 0
    written = sum(1 for t in prompt[breaks[-1] + 1 :] if rules.image_start <= t < rules.image_end)
    if written > rules.image_tokens:
        raise ValueError(f"prompt holds an open image of {written} tokens > {rules.image_tokens}")
    return (CLOSE if written == rules.image_tokens else IMAGE), written


class MixedModalState:
    """(B,) tensors: mode, image codes written in the open image, images closed, tokens generated."""

    def __init__(
        self, rules: MixedModalRules, prompts: Sequence[Sequence[int]], *,
        limits: Sequence[int] | None = None, device=None,
    ) -> None:
        """``limits``: per-row generation budget (defaults to ``rules.max_new_tokens``; the engine
        lowers it where the context would overflow)."""
        self.rules = rules
        limits = [rules.max_new_tokens] * len(prompts) if limits is None else list(limits)
        self.limit = torch.tensor(
            [min(int(x), rules.max_new_tokens) for x in limits], dtype=torch.int64, device=device
        )
        scanned = [scan_prompt(p, rules) for p in prompts]
        self.mode = torch.tensor([m for m, _ in scanned], dtype=torch.int64, device=device)
        self.image_pos = torch.tensor([w for _, w in scanned], dtype=torch.int64, device=device)
        self.images = torch.zeros(len(prompts), dtype=torch.int64, device=device)
        self.generated = torch.zeros(len(prompts), dtype=torch.int64, device=device)
        # Finished by <eos> (True) rather than by the length limit.
        self.hit_eos = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        self.mode = torch.where(self.limit <= 0, torch.full_like(self.mode, DONE), self.mode)
        V = rules.vocab_size
        ids = torch.arange(V, device=device)
        self._image_ok = (ids >= rules.image_start) & (ids < rules.image_end)  # (V,)
        # Text: the text range less image ids, frames and pad (an imported tokenizer's range holds them).
        self._text_ok = (ids >= rules.text_start) & (ids < rules.text_end) & ~self._image_ok \
            & (ids != rules.break_id) & (ids != rules.close_id) & (ids != rules.pad)  # (V,)
        if rules.text_holes:
            self._text_ok[torch.tensor(rules.text_holes, device=device)] = False

    @property
    def done(self) -> torch.Tensor:
        return self.mode == DONE

    def image_rows(self) -> torch.Tensor:
        """(B,) bool: rows whose next token is an image code (the guided ones)."""
        return self.mode == IMAGE

    def allowed(self) -> torch.Tensor:
        """(B, V) bool: which tokens each row may sample next (forced rows get their one token)."""
        r = self.rules
        B = self.mode.shape[0]
        remaining = self.limit - self.generated  # (B,)
        image_fits = remaining >= r.image_tokens + 2
        may_break = image_fits & (self.images < r.max_images)
        may_end = (self.images >= r.min_images) | ~image_fits
        allowed = torch.zeros(B, r.vocab_size, dtype=torch.bool, device=self.mode.device)
        text = self.mode == TEXT
        allowed |= text[:, None] & self._text_ok[None, :]
        allowed[:, r.break_id] |= text & may_break
        allowed[:, r.eos] |= text & may_end
        allowed |= (self.mode == IMAGE)[:, None] & self._image_ok[None, :]
        forced = self.forced()
        # Forced rows allow their one token (torch.where, not boolean indexing: no host sync).
        only_forced = torch.arange(r.vocab_size, device=forced.device)[None, :] == forced[:, None]  # (B, V)
        return torch.where((forced >= 0)[:, None], only_forced, allowed)

    def forced(self) -> torch.Tensor:
        """(B,) int64: the token a row must take next, -1 where it may choose."""
        r = self.rules
        remaining = self.limit - self.generated
        forced = torch.full_like(self.mode, -1)
        text = self.mode == TEXT
        image_fits = remaining >= r.image_tokens + 2
        owe_image = text & image_fits & (self.images < r.max_images) & (
            (r.force_image_first & (self.generated == 0) & (self.images == 0))
            # Owed images start as late as possible, and back to back.
            | ((self.images < r.min_images) & (remaining <= (r.min_images - self.images) * (r.image_tokens + 2)))
        )
        forced = torch.where(owe_image, torch.full_like(forced, r.break_id), forced)
        forced = torch.where(self.mode == CLOSE, torch.full_like(forced, r.close_id), forced)
        forced = torch.where(self.mode == DONE, torch.full_like(forced, r.pad), forced)
        return forced

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits with disallowed tokens at -inf."""
        return logits.masked_fill(~self.allowed(), float("-inf"))

    def advance(self, tokens: torch.Tensor) -> None:
        """Move every row past its chosen token (B,), in place."""
        r = self.rules
        live = self.mode != DONE
        mode = self.mode
        is_break = tokens == r.break_id
        new_mode = mode.clone()
        # TEXT: <break> opens an image, <eos> ends.
        new_mode = torch.where((mode == TEXT) & is_break, torch.full_like(mode, IMAGE), new_mode)
        ended = (mode == TEXT) & (tokens == r.eos)
        # IMAGE: count codes; the last one hands over to CLOSE.
        pos = torch.where(mode == IMAGE, self.image_pos + 1, self.image_pos)
        new_mode = torch.where((mode == IMAGE) & (pos >= r.image_tokens), torch.full_like(mode, CLOSE), new_mode)
        # CLOSE: the forced <break> (or end-of-image id) closes the image.
        closed = (mode == CLOSE) & (tokens == r.close_id)
        new_mode = torch.where(closed, torch.full_like(mode, TEXT), new_mode)
        pos = torch.where(closed | ((mode == TEXT) & is_break), torch.zeros_like(pos), pos)
        self.images.add_(closed.long())
        self.generated.add_(live.long())
        self.hit_eos.logical_or_(ended)
        out_of_room = self.generated >= self.limit
        new_mode = torch.where(ended | (live & out_of_room), torch.full_like(mode, DONE), new_mode)
        new_mode = torch.where(live, new_mode, mode)
        self.mode.copy_(new_mode)
        self.image_pos.copy_(pos)

    # In-place throughout: a decode step's buffers are these tensors (``step.DecodeBuffers``).
    _TENSORS = ("limit", "mode", "image_pos", "images", "generated", "hit_eos", "_text_ok", "_image_ok")

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the state (a decode step reads and writes them in place)."""
        return [getattr(self, n) for n in self._TENSORS]

    def copy_(self, other: "MixedModalState") -> "MixedModalState":
        """Take ``other``'s rules and values into this state's tensors (same shapes)."""
        self.rules = other.rules
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine.copy_(theirs)
        return self

    def clone(self) -> "MixedModalState":
        """A copy with tensors of its own."""
        new = object.__new__(type(self))
        new.rules = self.rules
        for n in self._TENSORS:
            setattr(new, n, getattr(self, n).clone())
        return new

"""Chatting in words and pictures: a ``Conversation`` (token ids) behind a text tokenizer and an
image tokenizer, what ``jam chat`` and ``jam serve`` share (issue 25; docs/CONVERSATIONS.md).

``ChatModel.load`` reads a checkpoint once (``checkpoints_tools.load_model``; its manifest must
have conversation tokens), its text tokenizer and, when given, the image tokenizer that turns
uploaded pictures into codes and drawn codes into PNGs. ``ChatModel.session()`` starts a
conversation with an engine of its own (the engine holds the conversation's KV cache; the weights
are shared). ``ChatSession.say(text, image=...)`` streams ``ChatEvent``s while the answer is
written: text as it is decoded, ``image_start`` when the model opens a picture and ``image`` with
its PNG bytes as soon as its last code is chosen, then ``done``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from jam_metaseq.vocab import VocabManifest

from .conversation import Conversation, Event, ImageDone, ImageStarted, TextDelta, TurnDone
from .engine import Engine
from .config import GenerationConfig


@dataclass
class ChatEvent:
    """One thing that happened while an answer was written (JSON-ready through ``to_dict``)."""

    kind: str
    """``text`` (``text``: the new characters), ``image_start``, ``image`` (``png``: the PNG file's
    bytes; ``codes`` when there is no image decoder), ``done`` (``finish_reason``)."""
    text: str = ""
    index: int = 0
    """The image's number in the answer (image events)."""
    png: bytes | None = None
    codes: list[list[int]] | None = None
    finish_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        if self.kind == "text":
            d["text"] = self.text
        if self.kind in ("image_start", "image"):
            d["index"] = self.index
        if self.codes is not None:
            d["codes"] = self.codes
        if self.kind == "done":
            d["finish_reason"] = self.finish_reason
        return d


@dataclass
class ChatModel:
    """A loaded model and its tokenizers, ready to start conversations."""

    model: torch.nn.Module
    vocab: VocabManifest
    tokenizer: Any
    """Text tokenizer (``encode``/``decode``)."""
    image_tokenizer: Any = None
    """``encode_images`` / ``decode_codes`` (uploads and drawn PNGs), or None."""
    decode: str = "eager"
    """The engine's decode mode (``eager``, ``static``, ``graph``)."""
    config: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling, guidance and limits of every answer."""

    @classmethod
    def load(cls, checkpoint: str | Path, *, vocab: str | None = None, tokenizer: str | None = None,
             image_tokenizer: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
             decode: str = "auto", config: GenerationConfig | None = None, trust_pickle: bool = False
             ) -> "ChatModel":
        from checkpoints_tools.load import load_model
        from jam_metaseq.data.tokenizers import load_text_tokenizer

        model, _, manifest = load_model(checkpoint, vocab=vocab, require_vocab=True, dtype=dtype, device=device,
                                        trust_pickle=trust_pickle)
        if not manifest.conversation_tokens:
            raise ValueError(f"{checkpoint}: its vocabulary has no conversation tokens (<user>, <assistant>, "
                             "<eot>): chat needs a model tuned on conversations (docs/CONVERSATIONS.md)")
        spec = tokenizer or manifest.text_tokenizer
        if spec is None:
            raise ValueError(f"{checkpoint}: no text tokenizer (give --tokenizer; the manifest names none)")
        images = None
        if image_tokenizer is not None:
            from jam_metaseq.image_tokenizer import load_image_tokenizer

            images = load_image_tokenizer(image_tokenizer, device=device, trust_pickle=trust_pickle)
            if tuple(images.grid) != tuple(manifest.image_grid) or images.n_codes != manifest.image_codes:
                raise ValueError(f"image tokenizer {image_tokenizer} has a {tuple(images.grid)} grid of "
                                 f"{images.n_codes} codes but the manifest says {tuple(manifest.image_grid)} "
                                 f"and {manifest.image_codes}")
        if decode == "auto":
            decode = "graph" if torch.device(device).type == "cuda" else "eager"
        return cls(model=model, vocab=manifest, tokenizer=load_text_tokenizer(spec), image_tokenizer=images,
                   decode=decode, config=config or GenerationConfig())

    def session(self) -> "ChatSession":
        """A new conversation (its own engine and KV cache)."""
        engine = Engine(self.model, vocab=self.vocab, decode=self.decode)
        return ChatSession(self, Conversation(engine, config=self.config))


class ChatSession:
    """One conversation in words and pictures."""

    def __init__(self, chat: ChatModel, conversation: Conversation) -> None:
        self.chat = chat
        self.conversation = conversation

    def encode_user(self, text: str, image: Any = None) -> list[int]:
        """The user turn's content ids: the image (a PIL image) first, then the text."""
        v = self.chat.vocab
        content: list[int] = []
        if image is not None:
            if self.chat.image_tokenizer is None:
                raise ValueError("this chat has no image tokenizer: it cannot read pictures (--image-tokenizer)")
            codes = np.asarray(self.chat.image_tokenizer.encode_images([image.convert("RGB")]))[0].reshape(-1)
            content += [v.break_id, *(int(v.image_id(c)) for c in codes), v.break_id]
        ids = [v.text_start + i for i in self.chat.tokenizer.encode(text)]
        if any(not v.is_text(i) for i in ids):
            raise ValueError(f"the tokenizer gives ids beyond the manifest's text_size {v.text_size}")
        content += ids
        if not content:
            raise ValueError("an empty message: write something or attach a picture")
        return content

    def png(self, codes: list[list[int]]) -> bytes | None:
        """The decoded picture as PNG bytes (None without an image decoder)."""
        if self.chat.image_tokenizer is None:
            return None
        img = self.chat.image_tokenizer.decode_codes(np.asarray([codes], dtype=np.int64))[0]
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    def say(self, text: str, *, image: Any = None, on_event: Callable[[ChatEvent], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> list[ChatEvent]:
        """Send a message (text and an optional PIL image); returns the events also streamed to ``on_event``."""
        content = self.encode_user(text, image)
        events: list[ChatEvent] = []
        text_stream = _TextStream(self.chat.tokenizer)
        images = 0

        def emit(e: ChatEvent) -> None:
            events.append(e)
            if on_event is not None:
                on_event(e)

        def on_token_event(e: Event) -> None:
            nonlocal images
            if isinstance(e, TextDelta):
                new = text_stream.add(e.id)
                if new:
                    emit(ChatEvent("text", text=new))
                return
            rest = text_stream.flush()
            if rest:
                emit(ChatEvent("text", text=rest))
            if isinstance(e, ImageStarted):
                emit(ChatEvent("image_start", index=images))
            elif isinstance(e, ImageDone):
                png = self.png(e.codes)
                emit(ChatEvent("image", index=images, png=png, codes=None if png is not None else e.codes))
                images += 1
            elif isinstance(e, TurnDone):
                emit(ChatEvent("done", finish_reason=e.answer.finish_reason))

        self.conversation.say(content, on_event=on_token_event, should_stop=should_stop)
        return events

    def reset(self) -> None:
        self.conversation.reset()


class _TextStream:
    """Decodes a run of text ids incrementally: emits only characters that will not change (a
    multi-byte character split across tokens waits for its last byte)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new

    def flush(self) -> str:
        """The rest of the run (it ended: an image or the end of the answer follows)."""
        text = self.tokenizer.decode(self.ids) if self.ids else ""
        new = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.ids, self.sent = [], ""
        return new

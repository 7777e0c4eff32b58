"""Interleaved image-text documents: the JSONL format, its validation and serialisation
(paper §3.1 "Tokenizers", §3.1.1 "Datasets"; CM3leon's sequence layout).

One document per line, in one of four shapes::

    [{"text": "A cat"}, {"image_tokens": [c0, ..., c1023]}, {"image": "cat.png"}, ...]
    {"segments": [...same segments...], ...any metadata keys...}
    {"prompt": "How to ...?" | [segments], "response": [segments]}      # instruction data
    {"turns": [{"role": "user", "segments": [...]},                       # conversation
               {"role": "assistant", "segments": [...]}, ...], ...any metadata keys...}

``image_tokens`` are VQ code indices in [0, vocab.image_codes) (exactly
``vocab.image_tokens_per_image`` of them); ``image`` is a file path (relative to the JSONL file's
folder) encoded by the configured image tokenizer: any object with
``encode_images(list[PIL.Image]) -> np.ndarray (N, h, w) int64``.

Serialisation (``tokenize_document``): text -> tokenizer ids + ``vocab.text_start``; every image ->
``<break> img_0 .. img_{n-1} <break>`` with ids ``vocab.image_start + code``; the document ends
with ``<eos>`` (the fairseq/metaseq document separator; no ``<s>`` is added). The loss mask is True
everywhere except on the prompt of an instruction document when ``response_loss_only``.

A conversation (docs/CONVERSATIONS.md; the vocabulary needs ``conversation_tokens``) alternates
user and assistant turns, starting with the user; images may sit in either role. Each turn is
``frame_turn``: ``<user>`` or ``<assistant>``, its segments as above, ``<eot>``; the closing
``<eos>`` follows the last turn. With ``response_loss_only`` the loss falls on exactly the
assistant's tokens: each assistant turn's segments and its ``<eot>`` (what a chat generates), never
a user turn, a role token or the closing ``<eos>`` (what a chat feeds).

Validation errors (``DocumentError``) name ``file:line`` and what is wrong: a line that is not
UTF-8 (each line is decoded on its own), bad JSON, unknown segment shape, wrong number of image
tokens, code out of range, missing image file, empty document, too long.
``iter_jsonl(..., on_error="skip")`` counts skipped lines by reason in a ``DataReport``; nothing
is dropped silently.

Public API::

    tokenize_document(doc, *, vocab, text_tokenizer, image_tokenizer=None, base_dir=None,
                      response_loss_only=True, max_tokens=None) -> (tokens int64 (L,), loss_mask bool (L,))
    detokenize_document(tokens, *, vocab, text_tokenizer) -> list[segment]
    detokenize_conversation(tokens, *, vocab, text_tokenizer) -> {"turns": [...]}
    validate_document(doc, *, vocab, base_dir=None) -> (prompt segments | None, segments)
    conversation_turns(doc) -> [(role, segments)] | None;  frame_turn(role, content, *, vocab)
    iter_jsonl(path, *, on_error="fail"|"skip", vocab, text_tokenizer=None, image_tokenizer=None,
               max_tokens=None, response_loss_only=True, report=None, transform=None) -> DocRecord...
    parse_jsonl_line(raw bytes | str) -> JSON value (DocumentError: not UTF-8, bad JSON)
    DocumentError(reason, where), DataReport
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jam_metaseq.errors import JamError
from jam_metaseq.inputs import InputError, check_int_list, load_rgb_image, loads_json
from jam_metaseq.vocab import VocabManifest

SEGMENT_KEYS = ("text", "image_tokens", "image")
CONVERSATION_ROLES = ("user", "assistant")
"""Turn roles, in the order they alternate (a conversation starts with the user)."""


class DocumentError(JamError, ValueError):
    """A document that does not validate; ``reason`` is a short category for the report."""

    def __init__(self, message: str, *, reason: str, where: str | None = None) -> None:
        self.reason = reason
        self.where = where
        self.detail = message
        super().__init__(f"{where}: {message}" if where else message)

    def at(self, where: str) -> "DocumentError":
        return DocumentError(self.detail, reason=self.reason, where=where)


@dataclass
class DataReport:
    """Counts gathered while reading documents (the summary of ``jam-data``)."""

    documents: int = 0
    """Documents accepted."""
    lines: int = 0
    """Non-blank lines read."""
    text_tokens: int = 0
    """Text-tokenizer tokens (after the shift into the vocabulary)."""
    image_tokens: int = 0
    """Image-code tokens (1024 per image by default)."""
    special_tokens: int = 0
    """<break>, <eos> and any other non-text, non-image tokens."""
    images: int = 0
    """Images."""
    skipped: Counter = field(default_factory=Counter)
    """Skipped lines by reason."""
    first_errors: list[str] = field(default_factory=list)
    """The first few error messages (file:line: what)."""

    @property
    def tokens(self) -> int:
        return self.text_tokens + self.image_tokens + self.special_tokens

    def add_tokens(self, tokens: np.ndarray, *, vocab: VocabManifest) -> None:
        n_text = int(vocab.is_text(tokens).sum())
        n_img = int(vocab.is_image(tokens).sum())
        self.documents += 1
        self.text_tokens += n_text
        self.image_tokens += n_img
        self.special_tokens += int(tokens.size) - n_text - n_img
        self.images += int((tokens == vocab.eoi).sum()) if vocab.eoi != vocab.boi else \
            int((tokens == vocab.boi).sum()) // 2

    def add_error(self, err: DocumentError, *, keep: int = 20) -> None:
        self.skipped[err.reason] += 1
        if len(self.first_errors) < keep:
            self.first_errors.append(str(err))

    def merge(self, other: "DataReport") -> None:
        for k in ("documents", "lines", "text_tokens", "image_tokens", "special_tokens", "images"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.skipped.update(other.skipped)
        self.first_errors.extend(other.first_errors[: max(0, 20 - len(self.first_errors))])

    def to_dict(self) -> dict[str, Any]:
        return {
            "documents": self.documents, "lines": self.lines, "tokens": self.tokens,
            "text_tokens": self.text_tokens, "image_tokens": self.image_tokens,
            "special_tokens": self.special_tokens, "images": self.images,
            "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values()),
            "first_errors": list(self.first_errors),
        }


# ---- schema ---------------------------------------------------------------------------------
def conversation_turns(doc: Any) -> list[tuple[str, list]] | None:
    """A conversation's ``[(role, segments)]`` (structure checked, segments not); None for any
    other document shape."""
    if not (isinstance(doc, dict) and "turns" in doc):
        return None
    turns = doc["turns"]
    if not isinstance(turns, list) or not turns:
        raise DocumentError("'turns' must be a non-empty list of turns", reason="bad_schema")
    out = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or set(turn) != {"role", "segments"}:
            keys = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
            raise DocumentError(f"turn {t}: expected exactly 'role' and 'segments', got {keys}", reason="bad_turn")
        role, segments = turn["role"], turn["segments"]
        want = CONVERSATION_ROLES[t % 2]
        if role != want:
            raise DocumentError(f"turn {t}: role {role!r}, expected {want!r} (turns alternate user, assistant, "
                                "... starting with the user)", reason="bad_turn")
        if not isinstance(segments, list) or not segments:
            raise DocumentError(f"turn {t}: 'segments' must be a non-empty list", reason="bad_turn")
        out.append((role, segments))
    return out


def frame_turn(role: str, content: Any, *, vocab: VocabManifest) -> np.ndarray:
    """One turn's tokens: ``<role> content <eot>`` (content: the segments' ids, images framed)."""
    return np.concatenate([[vocab.role_id(role)], np.asarray(content, dtype=np.int64), [vocab.eot]]).astype(np.int64)


def document_parts(doc: Any) -> tuple[list[dict] | None, list[dict]]:
    """Split a parsed document into (prompt segments or None, segments); raise on a bad shape.
    A conversation gives (None, every turn's segments in order)."""
    if isinstance(doc, list):
        return None, doc
    turns = conversation_turns(doc)
    if turns is not None:
        return None, [seg for _, segs in turns for seg in segs]
    if isinstance(doc, dict):
        if "response" in doc or "prompt" in doc:
            if "response" not in doc or "prompt" not in doc:
                raise DocumentError("instruction document needs both 'prompt' and 'response'",
                                    reason="bad_schema")
            prompt = doc["prompt"]
            if isinstance(prompt, str):
                prompt = [{"text": prompt}]
            response = doc["response"]
            if isinstance(response, str):
                response = [{"text": response}]
            if not isinstance(prompt, list) or not isinstance(response, list):
                raise DocumentError("'prompt' and 'response' must be strings or lists of segments",
                                    reason="bad_schema")
            return prompt, response
        if "segments" in doc:
            if not isinstance(doc["segments"], list):
                raise DocumentError("'segments' must be a list", reason="bad_schema")
            return None, doc["segments"]
        raise DocumentError("a document object needs 'segments', 'prompt'+'response' or 'turns'",
                            reason="bad_schema")
    raise DocumentError(f"a document must be a list of segments or an object, got {type(doc).__name__}",
                        reason="bad_schema")


def _check_segment(seg: Any, i: int, *, vocab: VocabManifest, base_dir: Path | None) -> None:
    if not isinstance(seg, dict) or len(seg) != 1 or next(iter(seg)) not in SEGMENT_KEYS:
        keys = sorted(seg) if isinstance(seg, dict) else type(seg).__name__
        raise DocumentError(
            f"segment {i}: expected exactly one of {list(SEGMENT_KEYS)}, got {keys}", reason="bad_segment")
    (key, value), = seg.items()
    if key == "text":
        if not isinstance(value, str):
            raise DocumentError(f"segment {i}: 'text' must be a string", reason="bad_segment")
    elif key == "image_tokens":
        if not isinstance(value, list) or not all(isinstance(c, int) and not isinstance(c, bool)
                                                  for c in value):
            raise DocumentError(f"segment {i}: 'image_tokens' must be a list of ints", reason="bad_segment")
        if len(value) != vocab.image_tokens_per_image:
            raise DocumentError(
                f"segment {i}: {len(value)} image tokens, expected {vocab.image_tokens_per_image}",
                reason="image_token_count")
        try:  # range-checked as Python ints: a code above 2**63 is out of range, not an OverflowError
            check_int_list(value, lo=0, hi=vocab.image_codes, what=f"segment {i}: image code")
        except InputError as e:
            raise DocumentError(e.detail, reason="image_code_range") from None
    else:
        if not isinstance(value, str) or not value:
            raise DocumentError(f"segment {i}: 'image' must be a file path", reason="bad_segment")
        path = Path(value) if base_dir is None else Path(base_dir) / value
        if not path.is_file():
            raise DocumentError(f"segment {i}: image file not found: {path}", reason="image_missing")


def validate_document(doc: Any, *, vocab: VocabManifest, base_dir: str | os.PathLike | None = None
                      ) -> tuple[list[dict] | None, list[dict]]:
    """Check a parsed document's structure (no tokenisation); return (prompt, segments)."""
    base = None if base_dir is None else Path(base_dir)
    turns = conversation_turns(doc)
    if turns is not None:
        if not vocab.conversation_tokens:
            raise DocumentError("a conversation needs a vocabulary with conversation tokens "
                                "(jam-data vocab --conversation-tokens)", reason="no_conversation_tokens")
        for t, (_, segs) in enumerate(turns):
            for i, seg in enumerate(segs):
                try:
                    _check_segment(seg, i, vocab=vocab, base_dir=base)
                except DocumentError as e:
                    raise DocumentError(f"turn {t} {e.detail}", reason=e.reason) from None
    prompt, segments = document_parts(doc)
    if turns is None:  # a conversation's segments were checked turn by turn
        for i, seg in enumerate(prompt or []):
            _check_segment(seg, i, vocab=vocab, base_dir=base)
        for i, seg in enumerate(segments):
            _check_segment(seg, i, vocab=vocab, base_dir=base)
    content = [s for s in (prompt or []) + segments if not ("text" in s and s["text"] == "")]
    if not content:
        raise DocumentError("empty document (no text and no image)", reason="empty")
    return prompt, segments


# ---- serialisation --------------------------------------------------------------------------
def _segments_tokens(
    segments: list[dict], *, vocab: VocabManifest, text_tokenizer: Any, image_tokenizer: Any,
    base_dir: Path | None,
) -> list[np.ndarray]:
    """One int64 array per segment, images already framed by <break>."""
    paths = [s["image"] for s in segments if "image" in s]
    encoded: list[np.ndarray] = []
    if paths:
        if image_tokenizer is None:
            raise DocumentError("'image' segment but no image tokenizer is configured "
                                "(pre-tokenise to 'image_tokens' or pass one)", reason="no_image_tokenizer")
        images = []
        for p in paths:
            full = Path(p) if base_dir is None else base_dir / p
            try:  # the pixel count is bounded from the header, before decoding
                images.append(load_rgb_image(full))
            except InputError as e:
                raise DocumentError(f"{e.detail}: {full}", reason=e.reason) from None
        codes = np.asarray(image_tokenizer.encode_images(images), dtype=np.int64)
        codes = codes.reshape(len(images), -1)  # (N, h*w)
        if codes.shape[1] != vocab.image_tokens_per_image:
            raise DocumentError(
                f"image tokenizer gave {codes.shape[1]} codes per image, the vocabulary expects "
                f"{vocab.image_tokens_per_image}", reason="image_token_count")
        if codes.size and (codes.min() < 0 or codes.max() >= vocab.image_codes):
            raise DocumentError(f"image tokenizer gave codes outside [0, {vocab.image_codes})",
                                reason="image_code_range")
        encoded = list(codes)
    out = []
    boi, eoi = np.array([vocab.boi], dtype=np.int64), np.array([vocab.eoi], dtype=np.int64)
    k = 0
    for seg in segments:
        if "text" in seg:
            ids = np.asarray(text_tokenizer.encode(seg["text"]), dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab.text_size):
                raise DocumentError(
                    f"text tokenizer id {int(ids.max())} does not fit the vocabulary's text_size "
                    f"{vocab.text_size}", reason="text_vocab_mismatch")
            out.append(ids + vocab.text_start)
        else:
            if "image_tokens" in seg:
                codes = np.asarray(seg["image_tokens"], dtype=np.int64)
            else:
                codes = encoded[k]
                k += 1
            out.append(np.concatenate([boi, vocab.image_id(codes), eoi]))
    return out


def tokenize_document(
    doc: Any,
    *,
    vocab: VocabManifest,
    text_tokenizer: Any,
    image_tokenizer: Any = None,
    base_dir: str | os.PathLike | None = None,
    response_loss_only: bool = True,
    max_tokens: int | None = None,
    validate: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Serialise one document: (tokens int64 (L,), loss_mask bool (L,)), ending with <eos>.

    ``max_tokens``: raise ``DocumentError(reason="too_long")`` when L exceeds it (instruction data
    should be fitted first with ``jam_metaseq.data.instruct.fit_document``).
    """
    base = None if base_dir is None else Path(base_dir)
    if validate:
        prompt, segments = validate_document(doc, vocab=vocab, base_dir=base)
    else:
        prompt, segments = document_parts(doc)
    kw = dict(vocab=vocab, text_tokenizer=text_tokenizer, image_tokenizer=image_tokenizer, base_dir=base)
    parts: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    turns = conversation_turns(doc)
    if turns is not None:
        seg_ids = iter(_segments_tokens(segments, **kw))  # every turn's images encoded in one batch
        for role, segs in turns:
            content = [next(seg_ids) for _ in segs]
            t = frame_turn(role, np.concatenate(content), vocab=vocab)
            trained = np.full(t.size, role == "assistant" or not response_loss_only, dtype=bool)
            trained[0] = not response_loss_only  # the role token is fed, never generated
            parts.append(t)
            masks.append(trained)
    else:
        if prompt:
            for t in _segments_tokens(prompt, **kw):
                parts.append(t)
                masks.append(np.full(t.size, not response_loss_only, dtype=bool))
        for t in _segments_tokens(segments, **kw):
            parts.append(t)
            masks.append(np.ones(t.size, dtype=bool))
    parts.append(np.array([vocab.eos], dtype=np.int64))
    masks.append(np.full(1, turns is None or not response_loss_only, dtype=bool))
    tokens = np.concatenate(parts)
    loss_mask = np.concatenate(masks)
    if tokens.size <= 1:
        raise DocumentError("empty document (text tokenised to nothing)", reason="empty")
    if max_tokens is not None and tokens.size > max_tokens:
        raise DocumentError(f"too long: {tokens.size} tokens > max {max_tokens}", reason="too_long")
    return tokens, loss_mask


def detokenize_document(tokens: np.ndarray, *, vocab: VocabManifest, text_tokenizer: Any) -> list[dict]:
    """Token ids -> segments (inverse of ``tokenize_document`` up to merging adjacent text).

    ``<break> codes <break>`` becomes ``{"image_tokens": codes}``; runs of text ids are decoded;
    ``<eos>``/``<s>``/``<pad>`` are dropped; any other id (sentinels, an unclosed image) raises.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    tokens = tokens[~np.isin(tokens, [vocab.eos, vocab.bos, vocab.pad])]
    out: list[dict] = []
    prev = 0
    for s, e in image_frames(tokens, vocab=vocab) + [(tokens.size, tokens.size)]:
        text = tokens[prev:s]
        if text.size:
            if not vocab.is_text(text).all():
                bad = int(text[~vocab.is_text(text)][0])
                raise ValueError(f"id {bad} at a text position is not a text token")
            out.append({"text": text_tokenizer.decode((text - vocab.text_start).tolist())})
        if e > s:
            codes = tokens[s + 1:e]
            if not vocab.is_image(codes).all():
                raise ValueError("non-image id between <break> tokens")
            out.append({"image_tokens": vocab.image_code(codes).tolist()})
        prev = e + 1
    return out


def image_frames(tokens: np.ndarray, *, vocab: VocabManifest) -> list[tuple[int, int]]:
    """(position of ``boi``, position of ``eoi``) of each image in ``tokens``: pairs of ``<break>``
    in our layout, each begin before its end where they differ (Chameleon); an unclosed image raises."""
    if vocab.boi == vocab.eoi:
        brk = np.flatnonzero(tokens == vocab.boi)
        if brk.size % 2:
            raise ValueError(f"unclosed image: {brk.size} <break> tokens")
        return list(zip(brk[0::2].tolist(), brk[1::2].tolist()))
    s, e = np.flatnonzero(tokens == vocab.boi), np.flatnonzero(tokens == vocab.eoi)
    if s.size != e.size or not ((s < e).all() and (e[:-1] < s[1:]).all()):
        raise ValueError(f"unclosed image: {s.size} image-begin ({vocab.boi}) and {e.size} image-end ({vocab.eoi}) "
                         "tokens out of order")
    return list(zip(s.tolist(), e.tolist()))


def detokenize_conversation(tokens: np.ndarray, *, vocab: VocabManifest, text_tokenizer: Any) -> dict:
    """Token ids of a conversation -> ``{"turns": [...]}`` (inverse of ``tokenize_document`` up to
    merging adjacent text): each ``<role> ... <eot>`` becomes a turn of ``detokenize_document``
    segments (an empty turn: one empty text); ``<eos>``/``<s>``/``<pad>`` between turns are dropped;
    a turn left open by the end of the tokens is kept (an answer being generated); anything else
    outside a turn raises."""
    tokens = np.asarray(tokens, dtype=np.int64)
    roles = {vocab.user_id: "user", vocab.assistant_id: "assistant"}
    turns: list[dict] = []
    i, n = 0, tokens.size
    while i < n:
        t = int(tokens[i])
        if t in (vocab.eos, vocab.bos, vocab.pad):
            i += 1
            continue
        if t not in roles:
            raise ValueError(f"id {t} at position {i} is outside a turn (expected <user> or <assistant>)")
        ends = np.flatnonzero(tokens[i + 1:] == vocab.eot)
        j = i + 1 + int(ends[0]) if ends.size else n
        body = tokens[i + 1:j]
        if np.isin(body, list(roles)).any():
            raise ValueError(f"turn at position {i} holds a role token before its <eot>")
        segments = detokenize_document(body, vocab=vocab, text_tokenizer=text_tokenizer)
        turns.append({"role": roles[t], "segments": segments or [{"text": ""}]})
        i = j + 1
    return {"turns": turns}


def parse_jsonl_line(raw: bytes | str) -> Any:
    """One JSONL line (bytes as read in binary mode, or text) -> its JSON value.

    Decoding happens here, per line, so a line that is not UTF-8 is one bad line
    (``reason="bad_encoding"``) that ``on_error="skip"`` can skip, not the end of the file; the
    bounds of ``jam_metaseq.inputs.loads_json`` (nesting depth, non-finite numbers, lone surrogates,
    integers too long to convert) are bad lines of their own reasons in the same way."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DocumentError(f"not UTF-8 (byte 0x{e.object[e.start]:02x} at byte {e.start + 1} of the line)",
                                reason="bad_encoding") from None
    try:
        return loads_json(raw)
    except InputError as e:  # bad JSON, nested too deep, NaN, a lone surrogate, a 5000-digit integer
        raise DocumentError(e.detail, reason=e.reason) from None


@dataclass
class DocRecord:
    """One accepted line of a JSONL file."""

    path: str
    line: int
    doc: Any
    tokens: np.ndarray | None = None
    loss_mask: np.ndarray | None = None


def iter_jsonl(
    path: str | os.PathLike,
    *,
    on_error: str = "fail",
    vocab: VocabManifest,
    text_tokenizer: Any = None,
    image_tokenizer: Any = None,
    max_tokens: int | None = None,
    response_loss_only: bool = True,
    report: DataReport | None = None,
    transform: Any = None,
) -> Iterator[DocRecord]:
    """Read, validate and (when a text tokenizer is given) tokenise a JSONL file line by line.

    on_error: ``fail`` raises the first ``DocumentError`` (message ``file:line: what``); ``skip``
    counts it in ``report.skipped`` and goes on. Blank lines are ignored. ``transform`` is an
    optional ``doc -> doc`` applied after JSON parsing (e.g. an instruct-data converter).
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    path = Path(path)
    base_dir = path.parent
    report = report if report is not None else DataReport()
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            report.lines += 1
            where = f"{path}:{lineno}"
            try:
                doc = parse_jsonl_line(line)
                if transform is not None:
                    doc = transform(doc)
                validate_document(doc, vocab=vocab, base_dir=base_dir)
                rec = DocRecord(path=str(path), line=lineno, doc=doc)
                if text_tokenizer is not None:
                    rec.tokens, rec.loss_mask = tokenize_document(
                        doc, vocab=vocab, text_tokenizer=text_tokenizer, image_tokenizer=image_tokenizer,
                        base_dir=base_dir, response_loss_only=response_loss_only, max_tokens=max_tokens,
                        validate=False)
                    report.add_tokens(rec.tokens, vocab=vocab)
                else:
                    report.documents += 1
            except DocumentError as e:
                err = e.at(where)
                if on_error == "fail":
                    raise err from None
                report.add_error(err)
                continue
            yield rec

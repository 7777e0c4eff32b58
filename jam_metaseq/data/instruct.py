"""Instruction data for multimodal conversational instruct tuning (paper §2.2, §3.1.1 LIMA and
wikiHow).

Converters turn source records into the instruction document shape of ``documents.py``,
``{"prompt": ..., "response": [segments]}``, or into its conversation shape ``{"turns": [...]}``;
the loss then falls on the response (the assistant's turns) only when ``response_loss_only`` (the
default of ``tokenize_document``).

- LIMA (``lima_to_document``): ``{"conversations": [question, answer, ...]}`` (the released
  format) or ``{"prompt": str, "response": str}``. With a vocabulary that has conversation tokens
  (``make_transform``) every exchange is kept, as a conversation (``all_turns=True``: a trailing
  question without an answer is dropped); without them only the first exchange, as a prompt and a
  response. Converted prompts end with ``PROMPT_SUFFIX`` ("\\n\\n") so the response start is
  visible (a conversation's role tokens mark it instead).
- wikiHow (``wikihow_to_document``): ``{"title": str, "segments": [segments]}``. The title is the
  prompt; "This article" / "this article" becomes "The following answer" / "the following answer";
  only the first ``max_images`` (3) images are kept (later ones are dropped, their text stays).
- ``fit_document`` fits an instruction document into ``max_tokens`` (4096) with this rule: the
  prompt is never cut (a prompt that alone does not fit is a ``too_long`` error); response segments
  are kept in order while they fit; at the first one that does not fit, a text segment is cut at
  the last whole word that fits and an image is dropped (images are never cut); everything after
  it is dropped. The closing ``<eos>`` is counted.
- ``fit_conversation`` fits a conversation into ``max_tokens`` (docs/CONVERSATIONS.md): the oldest
  whole exchanges (a user turn and the assistant turn after it) are dropped, fewest first, until
  it fits (``fit_turns``, the rule the chat uses too); the last user turn is never dropped and no
  turn is cut, except that when the last exchange alone does not fit, its assistant turn (when the
  conversation ends with one) is cut as ``fit_document`` cuts a response (images never cut); a last
  user turn that alone does not fit, or leaves no room for a word of its answer, is a ``too_long``
  error. Role tokens, ``<eot>`` and the closing ``<eos>`` are counted.

Public API::

    lima_to_document(record, *, prompt_suffix="\\n\\n", all_turns=False) -> dict
    wikihow_to_document(article, *, max_images=3, prompt_suffix="\\n\\n") -> dict
    fit_document(doc, *, vocab, text_tokenizer, max_tokens=4096) -> dict
    fit_turns(lengths, *, budget) -> index of the first turn kept
    fit_conversation(doc, *, vocab, text_tokenizer, max_tokens=4096) -> dict
    make_transform(kind, *, vocab, text_tokenizer, max_tokens=4096, max_images=3) -> doc -> doc
        kind: "plain" (None: no transform), "lima", "wikihow", "conversation"
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

from jam_metaseq.data.documents import DocumentError, conversation_turns, document_parts
from jam_metaseq.vocab import VocabManifest

FORMATS = ("plain", "lima", "wikihow", "conversation")
PROMPT_SUFFIX = "\n\n"
"""Appended to a converted prompt so the model sees where the response starts."""
_THIS_ARTICLE = re.compile(r"\b([Tt])his article\b")


def lima_to_document(record: Any, *, prompt_suffix: str = PROMPT_SUFFIX, all_turns: bool = False
                     ) -> dict[str, Any]:
    """A LIMA record -> ``{"prompt": question + suffix, "response": [{"text": answer}]}``, or with
    ``all_turns`` ``{"turns": [user, assistant, ...]}`` of every answered question."""
    if isinstance(record, dict) and "conversations" in record:
        conv = record["conversations"]
        if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(c, str) for c in conv[:2]):
            raise DocumentError("LIMA 'conversations' needs a question and an answer string", reason="bad_schema")
        if all_turns:
            bad = [i for i, c in enumerate(conv) if not isinstance(c, str)]
            if bad:
                raise DocumentError(f"LIMA 'conversations' entry {bad[0]} is not a string", reason="bad_schema")
            answered = conv[: len(conv) // 2 * 2]
            return {"turns": [{"role": "user" if i % 2 == 0 else "assistant", "segments": [{"text": c}]}
                              for i, c in enumerate(answered)]}
        return {"prompt": conv[0] + prompt_suffix, "response": [{"text": conv[1]}]}
    if isinstance(record, dict) and "prompt" in record and "response" in record:
        return record
    raise DocumentError("a LIMA record needs 'conversations' or 'prompt' + 'response'", reason="bad_schema")


def rewrite_this_article(text: str) -> str:
    """'This article ...' -> 'The following answer ...' (keeps the case of the first letter)."""
    return _THIS_ARTICLE.sub(lambda m: ("The" if m.group(1) == "T" else "the") + " following answer", text)


def wikihow_to_document(article: Any, *, max_images: int = 3, prompt_suffix: str = PROMPT_SUFFIX
                        ) -> dict[str, Any]:
    """A wikiHow article ``{"title", "segments"}`` -> instruction document (title as prompt)."""
    if not isinstance(article, dict) or not isinstance(article.get("title"), str) \
            or not isinstance(article.get("segments"), list):
        raise DocumentError("a wikiHow article needs 'title' (string) and 'segments' (list)", reason="bad_schema")
    response = []
    images = 0
    for seg in article["segments"]:
        if isinstance(seg, dict) and "text" in seg and isinstance(seg["text"], str):
            response.append({"text": rewrite_this_article(seg["text"])})
        elif isinstance(seg, dict) and ("image" in seg or "image_tokens" in seg):
            if images < max_images:
                response.append(seg)
            images += 1
        else:
            response.append(seg)  # validation reports it
    return {"prompt": article["title"] + prompt_suffix, "response": response}


def _text_len(text: str, text_tokenizer: Any) -> int:
    return len(text_tokenizer.encode(text))


def _fit_segments(segments: list, *, used: int, max_tokens: int, seg_len: Callable[[Any], int],
                  text_tokenizer: Any) -> tuple[list, bool, int]:
    """Segments kept in order while they fit after ``used`` tokens; the first that does not fit is
    cut at its last whole word (text) or dropped (image), the rest dropped. -> (kept, changed, used)."""
    kept: list[dict] = []
    for seg in segments:
        n = seg_len(seg)
        if used + n <= max_tokens:
            kept.append(seg)
            used += n
            continue
        if isinstance(seg, dict) and isinstance(seg.get("text"), str):  # cut at the last whole word that fits (binary search over words)
            words = re.split(r"(?<=\s)(?=\S)", seg["text"])
            lo, hi = 0, len(words)  # words[:lo] fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if used + _text_len("".join(words[:mid]), text_tokenizer) <= max_tokens:
                    lo = mid
                else:
                    hi = mid - 1
            cut = "".join(words[:lo]).rstrip()
            if cut:
                kept.append({"text": cut})
                used += _text_len(cut, text_tokenizer)
        return kept, True, used
    return kept, False, used


def _seg_len_fn(vocab: VocabManifest, text_tokenizer: Any) -> Callable[[Any], int]:
    img_len = vocab.image_tokens_per_image + 2  # <break> codes <break>

    def seg_len(seg: Any) -> int:  # malformed segments count as images; validation reports them
        if isinstance(seg, dict) and isinstance(seg.get("text"), str):
            return _text_len(seg["text"], text_tokenizer)
        return img_len

    return seg_len


def fit_document(doc: Any, *, vocab: VocabManifest, text_tokenizer: Any, max_tokens: int = 4096) -> Any:
    """Apply the truncation rule of the module docstring; documents that fit come back unchanged
    (conversations go to ``fit_conversation``)."""
    if conversation_turns(doc) is not None:
        return fit_conversation(doc, vocab=vocab, text_tokenizer=text_tokenizer, max_tokens=max_tokens)
    prompt, segments = document_parts(doc)
    seg_len = _seg_len_fn(vocab, text_tokenizer)
    used = 1 + sum(seg_len(s) for s in (prompt or []))  # + <eos>
    if used > max_tokens:
        raise DocumentError(f"too long: the prompt alone takes {used} tokens > max {max_tokens}",
                            reason="too_long")
    kept, changed, _ = _fit_segments(segments, used=used, max_tokens=max_tokens, seg_len=seg_len,
                                     text_tokenizer=text_tokenizer)
    if not changed:
        return doc
    if prompt is None:
        return kept if isinstance(doc, list) else {**doc, "segments": kept}
    return {**doc, "response": kept}


def fit_turns(lengths: Sequence[int], *, budget: int) -> int:
    """The index of the first turn kept when a conversation of turns of ``lengths`` tokens
    (alternating user, assistant, from a user turn) must fit ``budget``: the oldest whole exchanges
    are dropped, as few as fit, never the last user turn. The turns from there may still not fit
    (then only the last exchange is left: the caller cuts its answer or gives up)."""
    last_user = (len(lengths) - 1) // 2 * 2
    total = sum(lengths)
    first = 0
    while total > budget and first < last_user:
        total -= lengths[first] + lengths[first + 1]
        first += 2
    return first


def fit_conversation(doc: Any, *, vocab: VocabManifest, text_tokenizer: Any, max_tokens: int = 4096) -> Any:
    """Apply the conversation rule of the module docstring; conversations that fit come back unchanged."""
    turns = conversation_turns(doc)
    if turns is None:
        raise DocumentError("not a conversation (no 'turns')", reason="bad_schema")
    seg_len = _seg_len_fn(vocab, text_tokenizer)
    lengths = [2 + sum(seg_len(s) for s in segs) for _, segs in turns]  # <role> ... <eot>
    budget = max_tokens - 1  # the closing <eos>
    first = fit_turns(lengths, budget=budget)
    if sum(lengths[first:]) <= budget:
        return doc if first == 0 else {**doc, "turns": doc["turns"][first:]}
    # only the last exchange is left and it does not fit: cut its answer, never its question
    if lengths[first] > budget:
        raise DocumentError(f"too long: the last user turn alone takes {lengths[first] + 1} tokens > max "
                            f"{max_tokens}", reason="too_long")
    answer = doc["turns"][first + 1]
    kept, _, _ = _fit_segments(answer["segments"], used=lengths[first] + 2, max_tokens=budget, seg_len=seg_len,
                               text_tokenizer=text_tokenizer)
    if not kept:
        raise DocumentError(f"too long: the last user turn ({lengths[first] + 1} tokens) leaves no room for "
                            f"its answer in {max_tokens}", reason="too_long")
    return {**doc, "turns": [doc["turns"][first], {**answer, "segments": kept}]}


def make_transform(
    kind: str, *, vocab: VocabManifest, text_tokenizer: Any, max_tokens: int | None = 4096,
    max_images: int = 3,
) -> Callable[[Any], Any] | None:
    """A ``doc -> doc`` converter for ``iter_jsonl``/``binarize`` (None for plain documents)."""
    if kind not in FORMATS:
        raise ValueError(f"unknown data format {kind!r}; expected one of {FORMATS}")
    if kind == "plain":
        return None
    if kind == "lima":
        def convert(record: Any) -> Any:
            return lima_to_document(record, all_turns=vocab.conversation_tokens)
    elif kind == "wikihow":
        def convert(record: Any) -> Any:
            return wikihow_to_document(record, max_images=max_images)
    else:
        def convert(record: Any) -> Any:
            if conversation_turns(record) is None:
                raise DocumentError("--format conversation: expected {\"turns\": [...]}", reason="bad_schema")
            return record

    def transform(record: Any) -> Any:
        doc = convert(record)
        if max_tokens is not None:
            doc = fit_document(doc, vocab=vocab, text_tokenizer=text_tokenizer, max_tokens=max_tokens)
        return doc

    return transform

"""Instruction data for multimodal conversational instruct tuning (paper §2.2, §3.1.1 LIMA and
wikiHow).

Converters turn source records into the instruction document shape of ``documents.py``,
``{"prompt": ..., "response": [segments]}``; the loss then falls on the response only when
``response_loss_only`` (the default of ``tokenize_document``).

- LIMA (``lima_to_document``): ``{"conversations": [question, answer, ...]}`` (the released
  format) or ``{"prompt": str, "response": str}``; only the first exchange is kept. Converted
  prompts end with ``PROMPT_SUFFIX`` ("\\n\\n") so the response start is visible.
- wikiHow (``wikihow_to_document``): ``{"title": str, "segments": [segments]}``. The title is the
  prompt; "This article" / "this article" becomes "The following answer" / "the following answer";
  only the first ``max_images`` (3) images are kept (later ones are dropped, their text stays).
- ``fit_document`` fits an instruction document into ``max_tokens`` (4096) with this rule: the
  prompt is never cut (a prompt that alone does not fit is a ``too_long`` error); response segments
  are kept in order while they fit; at the first one that does not fit, a text segment is cut at
  the last whole word that fits and an image is dropped (images are never cut); everything after
  it is dropped. The closing ``<eos>`` is counted.

Public API::

    lima_to_document(record, *, prompt_suffix="\\n\\n") -> dict
    wikihow_to_document(article, *, max_images=3, prompt_suffix="\\n\\n") -> dict
    fit_document(doc, *, vocab, text_tokenizer, max_tokens=4096) -> dict
    make_transform(kind, *, vocab, text_tokenizer, max_tokens=4096, max_images=3) -> doc -> doc
        kind: "plain" (None: no transform), "lima", "wikihow"
"""

from __future__ import annotations

import re
from typing import Any, Callable

from jam_metaseq.data.documents import DocumentError, document_parts
from jam_metaseq.vocab import VocabManifest

FORMATS = ("plain", "lima", "wikihow")
PROMPT_SUFFIX = "\n\n"
"""Appended to a converted prompt so the model sees where the response starts."""
_THIS_ARTICLE = re.compile(r"\b([Tt])his article\b")


def lima_to_document(record: Any, *, prompt_suffix: str = PROMPT_SUFFIX) -> dict[str, Any]:
    """A LIMA record -> ``{"prompt": question + suffix, "response": [{"text": answer}]}``."""
    if isinstance(record, dict) and "conversations" in record:
        conv = record["conversations"]
        if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(c, str) for c in conv[:2]):
            raise DocumentError("LIMA 'conversations' needs a question and an answer string", reason="bad_schema")
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


def fit_document(doc: Any, *, vocab: VocabManifest, text_tokenizer: Any, max_tokens: int = 4096) -> Any:
    """Apply the truncation rule of the module docstring; documents that fit come back unchanged."""
    prompt, segments = document_parts(doc)
    img_len = vocab.image_tokens_per_image + 2  # <break> codes <break>

    def seg_len(seg: Any) -> int:  # malformed segments count as images; validation reports them
        if isinstance(seg, dict) and isinstance(seg.get("text"), str):
            return _text_len(seg["text"], text_tokenizer)
        return img_len

    used = 1 + sum(seg_len(s) for s in (prompt or []))  # + <eos>
    if used > max_tokens:
        raise DocumentError(f"too long: the prompt alone takes {used} tokens > max {max_tokens}",
                            reason="too_long")
    kept: list[dict] = []
    changed = False
    for seg in segments:
        n = seg_len(seg)
        if used + n <= max_tokens:
            kept.append(seg)
            used += n
            continue
        changed = True
        if isinstance(seg, dict) and isinstance(seg.get("text"), str):  # cut at the last whole word that fits (binary search over words)
            words = re.split(r"(?<=\s)(?=\S)", seg["text"])
            lo, hi = 0, len(words)  # words[:lo] fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if used + _text_len("".join(words[:mid]), text_tokenizer) <= max_tokens:
                    lo = mid
                else:
                    hi = mid - 1
            if lo:
                kept.append({"text": "".join(words[:lo]).rstrip()})
        break
    if not changed:
        return doc
    if prompt is None:
        return kept if isinstance(doc, list) else {**doc, "segments": kept}
    return {**doc, "response": kept}


def make_transform(
    kind: str, *, vocab: VocabManifest, text_tokenizer: Any, max_tokens: int | None = 4096,
    max_images: int = 3,
) -> Callable[[Any], Any] | None:
    """A ``doc -> doc`` converter for ``iter_jsonl``/``binarize`` (None for plain documents)."""
    if kind not in FORMATS:
        raise ValueError(f"unknown data format {kind!r}; expected one of {FORMATS}")
    if kind == "plain":
        return None
    convert = lima_to_document if kind == "lima" else (
        lambda a: wikihow_to_document(a, max_images=max_images))

    def transform(record: Any) -> Any:
        doc = convert(record)
        if max_tokens is not None:
            doc = fit_document(doc, vocab=vocab, text_tokenizer=text_tokenizer, max_tokens=max_tokens)
        return doc

    return transform

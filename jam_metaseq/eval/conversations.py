"""Does the model use the conversation? Two measurements on the built-in generator's multi-turn sets
(issue 25 items 2 and 5; ``jam_metaseq.quickstart_data``), for the report of every variant.

``history_ppl``: the assistant-turn perplexity of every follow-up exchange (the second and later
of a conversation) scored twice by ``eval.ppl.perplexity``, the project's one rule: with the
history before it, and with the history removed (the exchange alone, as a conversation of its
own). The targets are the same tokens both times, the follow-up answer's segments and its
``<eot>`` (``documents.tokenize_document``'s loss mask, cut to the last exchange), so the two
figures compare directly: a model that uses the history ("now make it blue", "what colour was the
background?") has a lower PPL with it; ``ratio`` = without / with.

``prompt_following``: for each drawing prompt (``quickstart_data.drawing_prompts``: single-turn or
a follow-up after a first exchange, given to the model as history) and each seed, a
``generation.Conversation`` answers the last request with one picture (CFG with the conversation's
unconditional row); the picture is decoded and read off its pixels (``eval.drawing``): the share
whose background, shape colour and shape match what was asked.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from torch import nn

from jam_metaseq.data.documents import conversation_turns, tokenize_document
from jam_metaseq.vocab import VocabManifest

from .ppl import perplexity


def last_exchange_mask(tokens: np.ndarray, mask: np.ndarray, *, vocab: VocabManifest) -> np.ndarray:
    """The loss mask kept only from the last ``<user>`` on (the last exchange's answer)."""
    users = np.flatnonzero(tokens == vocab.user_id)
    out = mask.copy()
    if users.size:
        out[:users[-1]] = False
    return out


def history_ppl(model: nn.Module, docs: Sequence[Any], *, vocab: VocabManifest, text_tokenizer: Any,
                image_tokenizer: Any = None, base_dir: Any = None, batch_size: int = 8,
                device: Any = None) -> dict[str, Any]:
    """Assistant-turn PPL of the follow-up exchanges of ``docs`` (conversations) with and without
    their history: ``{"with_history", "without_history"}`` (``perplexity`` dicts), ``exchanges``
    and ``ratio`` (without / with)."""
    kw = dict(vocab=vocab, text_tokenizer=text_tokenizer, image_tokenizer=image_tokenizer, base_dir=base_dir)
    sets: dict[str, tuple[list, list]] = {"with_history": ([], []), "without_history": ([], [])}
    for j, doc in enumerate(docs):
        turns = conversation_turns(doc)
        if turns is None:
            raise ValueError(f"document {j} is not a conversation")
        for end in range(4, len(doc["turns"]) + 1, 2):  # every exchange after the first, with its answer
            for name, part in (("with_history", doc["turns"][:end]), ("without_history", doc["turns"][end - 2:end])):
                tokens, mask = tokenize_document({"turns": part}, **kw)
                sets[name][0].append(tokens)
                sets[name][1].append(last_exchange_mask(tokens, mask, vocab=vocab))
    n = len(sets["with_history"][0])
    if n == 0:
        raise ValueError("no follow-up exchanges: every conversation has a single exchange")
    out: dict[str, Any] = {name: perplexity(model, seqs, vocab=vocab, masks=masks, batch_size=batch_size, device=device)
                           for name, (seqs, masks) in sets.items()}
    assert out["with_history"]["tokens"] == out["without_history"]["tokens"]  # the same targets
    out["exchanges"] = n
    out["ratio"] = out["without_history"]["ppl"] / out["with_history"]["ppl"]
    return out


def turn_content(parts: Sequence[Any], *, vocab: VocabManifest, text_tokenizer: Any, image_tokenizer: Any
                 ) -> list[int]:
    """A generator turn's parts (sentences, ``quickstart_data.Picture``s) -> content ids."""
    out: list[int] = []
    for part in parts:
        if isinstance(part, str):
            out += [vocab.text_start + i for i in text_tokenizer.encode(part)]
        else:
            codes = np.asarray(image_tokenizer.encode_images([part.image]))[0].reshape(-1)
            out += [vocab.break_id, *(int(vocab.image_id(c)) for c in codes), vocab.break_id]
    return out


def prompt_following(model: nn.Module, prompts: Sequence[Any], *, vocab: VocabManifest, text_tokenizer: Any,
                     image_tokenizer: Any, seeds: Sequence[int] = (0, 1, 2), config: Any = None,
                     classifier: Any = None, decode: str = "eager") -> dict[str, Any]:
    """Accuracy of the pictures drawn for ``prompts`` (``ConversationSample``s ending with the
    expected answer; its ``target`` is what the picture must show), ``len(seeds)`` pictures each:
    ``score_pictures``'s dict plus ``pictures`` (PIL, or None where no picture was drawn)."""
    from jam_metaseq.generation.config import GenerationConfig
    from jam_metaseq.generation.conversation import Conversation
    from jam_metaseq.generation.engine import Engine

    from .drawing import score_pictures, train_shape_classifier

    if config is None:
        config = GenerationConfig(max_new_tokens=vocab.image_tokens_per_image + 2 + 32)
    config = dataclasses.replace(config, min_images=1, max_images=1)
    if classifier is None:
        classifier = train_shape_classifier(size=getattr(image_tokenizer, "resolution", 32))
    pictures, targets = [], []
    for prompt in prompts:
        if prompt.target is None:
            raise ValueError(f"a {prompt.kind} prompt whose answer draws no picture")
        enc = [(role, turn_content(parts, vocab=vocab, text_tokenizer=text_tokenizer, image_tokenizer=image_tokenizer))
               for role, parts in prompt.turns[:-1]]
        for seed in seeds:
            conv = Conversation(Engine(model, vocab=vocab, decode=decode), config=config)
            conv.extend(enc[:-1])
            answer = conv.say(enc[-1][1], seed=seed)
            drawn = [s for s in answer.images if s.complete]
            pictures.append(image_tokenizer.decode_codes(np.asarray([drawn[0].codes]))[0] if drawn else None)
            targets.append(prompt.target)
    out = score_pictures(pictures, targets, classifier=classifier)
    out["pictures"] = pictures
    out["prompts"] = len(prompts)
    out["seeds"] = list(seeds)
    return out

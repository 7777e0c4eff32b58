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
whose background, shape colour and shape match what was asked, and the share of answers the model
closed with ``<eot>`` (it learned where its turn ends).

``caption_following``: the same single-turn score for a model that was never tuned on
conversations (the parents, every variant after continued pretraining), asked by the picture's
caption as its caption documents are laid out, so every variant's drawing is scored beside its
caption PPL (``evaluate_drawing``, one checkpoint, as ``jam run`` runs it).

``evaluate_conversations``: both for one checkpoint, as ``jam run``'s evaluation stage runs them
(module-level, so a SLURM job can run it): the history PPL on conversation JSONL files (converted
and fitted as the instruct data were), prompt-following on the given drawing prompts.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
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
    ``score_pictures``'s dict plus ``ended_with_eot`` (the share of answers closed by the model's
    own ``<eot>``, not cut at ``max_new_tokens``) and ``pictures`` (PIL, or None where no picture
    was drawn)."""
    from jam_metaseq.generation.config import GenerationConfig
    from jam_metaseq.generation.conversation import Conversation
    from jam_metaseq.generation.engine import Engine

    from .drawing import score_pictures, train_shape_classifier

    if config is None:
        config = GenerationConfig(max_new_tokens=vocab.image_tokens_per_image + 2 + 32)
    config = dataclasses.replace(config, min_images=1, max_images=1)
    if classifier is None:
        classifier = train_shape_classifier(size=getattr(image_tokenizer, "resolution", 32))
    pictures, targets, ended = [], [], []
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
            ended.append(answer.finish_reason == "eot")
    out = score_pictures(pictures, targets, classifier=classifier)
    out["ended_with_eot"] = float(np.mean(ended)) if ended else float("nan")
    out["pictures"] = pictures
    out["prompts"] = len(prompts)
    out["seeds"] = list(seeds)
    return out


def caption_prompt(target: Any) -> str:
    """The caption a model that was not tuned on conversations is prompted with to draw ``target``:
    the generator's first caption template, the words its caption documents put before the picture."""
    from jam_metaseq.quickstart_data import CAPTION_TEMPLATES

    return CAPTION_TEMPLATES[0].format(colour=target.colour, shape=target.shape, background=target.background)


def caption_following(model: nn.Module, prompts: Sequence[Any], *, vocab: VocabManifest, text_tokenizer: Any,
                      image_tokenizer: Any, seeds: Sequence[int] = (0, 1, 2), config: Any = None,
                      classifier: Any = None, batch_size: int = 16, decode: str = "eager") -> dict[str, Any]:
    """``prompt_following`` single-turn for a model without conversation tokens (a parent, a variant
    after continued pretraining): each prompt's picture asked for by its caption (``caption_prompt``,
    after ``<eos>`` as every document starts) and drawn at once, as the caption documents lay it out
    (``force_image_first``; CFG's unconditional row masks the caption, the single-prompt default).
    The same scores as ``prompt_following`` (no ``ended_with_eot``: the answer is the picture)."""
    from jam_metaseq.generation.config import GenerationConfig
    from jam_metaseq.generation.engine import Engine

    from .drawing import score_pictures, train_shape_classifier

    if config is None:
        config = GenerationConfig()
    config = dataclasses.replace(config, max_new_tokens=vocab.image_tokens_per_image + 2, min_images=1,
                                 max_images=1, force_image_first=True, end_id=None)
    if classifier is None:
        classifier = train_shape_classifier(size=getattr(image_tokenizer, "resolution", 32))
    rows, targets, row_seeds = [], [], []
    for prompt in prompts:
        if prompt.target is None:
            raise ValueError(f"a {prompt.kind} prompt whose answer draws no picture")
        ids = [vocab.eos] + [vocab.text_start + i for i in text_tokenizer.encode(caption_prompt(prompt.target))]
        for seed in seeds:
            rows.append(ids)
            targets.append(prompt.target)
            row_seeds.append(seed)
    engine = Engine(model, vocab=vocab, decode=decode)
    pictures = []
    for lo in range(0, len(rows), batch_size):
        for answer in engine.generate(rows[lo:lo + batch_size], config=config, seeds=row_seeds[lo:lo + batch_size]):
            drawn = [s for s in answer.images if s.complete]
            pictures.append(image_tokenizer.decode_codes(np.asarray([drawn[0].codes]))[0] if drawn else None)
    out = score_pictures(pictures, targets, classifier=classifier)
    out["pictures"] = pictures
    out["prompts"] = len(prompts)
    out["seeds"] = list(seeds)
    return out


def _absolute_images(doc: Any, base: Path) -> Any:
    """``doc`` with every ``{"image": path}`` made absolute against ``base`` (files of several folders
    in one call)."""
    turns = conversation_turns(doc)
    if turns is None:
        return doc
    fix = lambda seg: {**seg, "image": str(base / seg["image"])} if isinstance(seg, dict) and \
        isinstance(seg.get("image"), str) else seg  # noqa: E731
    return {**doc, "turns": [{"role": r, "segments": [fix(g) for g in segs]} for r, segs in turns]}


def _picture_sheet(pictures: Sequence[Any], path: Path, *, columns: int) -> None:
    """The drawn pictures side by side (grey where none was drawn), one row per prompt."""
    from PIL import Image

    size = next((p.size for p in pictures if p is not None), (32, 32))
    rows = -(-len(pictures) // columns)
    sheet = Image.new("RGB", (columns * (size[0] + 2), rows * (size[1] + 2)), (128, 128, 128))
    for i, p in enumerate(pictures):
        if p is not None:
            sheet.paste(p.convert("RGB"), ((i % columns) * (size[0] + 2), (i // columns) * (size[1] + 2)))
    tmp = path.with_name(path.name + ".tmp.png")
    sheet.save(tmp)
    os.replace(tmp, path)


def evaluate_conversations(*, checkpoint: str, conversations: Sequence[str], fmt: str = "conversation",
                           max_tokens: int | None = None, image_tokenizer: str | None = None,
                           drawing: dict[str, Sequence[Any]] | None = None, seeds: Sequence[int] = (0, 1),
                           config: Any = None, out_dir: str | None = None, batch_size: int = 8,
                           device: str = "cpu", progress: bool = False) -> dict[str, Any]:
    """One checkpoint (its manifest has the conversation tokens) on conversations:
    ``{"history_ppl": {with_history, without_history, ratio, exchanges, tokens}}`` over the
    conversations of the JSONL files ``conversations`` (records of format ``fmt``, converted and
    fitted to ``max_tokens`` by ``data.instruct.make_transform``; None when none has a follow-up
    exchange after fitting), and with ``drawing`` (set name ->
    ``ConversationSample`` prompts) ``{"prompt_following": {set: prompt_following's scores}}``, the
    pictures written to ``out_dir/drawing-<set>.png`` (one row per prompt, one column per seed)."""
    from checkpoints_tools.load import load_model
    from jam_metaseq.data.documents import iter_jsonl
    from jam_metaseq.data.instruct import make_transform
    from jam_metaseq.data.tokenizers import load_text_tokenizer

    model, _, vocab = load_model(checkpoint, require_vocab=True, device=device)
    if not vocab.conversation_tokens:
        raise ValueError(f"{checkpoint}: its vocabulary has no conversation tokens")
    text_tok = load_text_tokenizer(vocab.text_tokenizer)
    image_tok = None
    if image_tokenizer is not None:
        from jam_metaseq.image_tokenizer import load_image_tokenizer

        image_tok = load_image_tokenizer(image_tokenizer, device=device)
    transform = make_transform(fmt, vocab=vocab, text_tokenizer=text_tok, max_tokens=max_tokens)
    docs = []
    for path in conversations:  # lines the instruct data skipped (--on-error skip) are skipped here too
        for rec in iter_jsonl(path, vocab=vocab, transform=transform, on_error="skip"):
            if conversation_turns(rec.doc) is not None and len(rec.doc["turns"]) >= 4:
                docs.append(_absolute_images(rec.doc, Path(path).parent))
    out: dict[str, Any] = {"history_ppl": None}  # None: no conversation with a follow-up
    if docs:
        h = history_ppl(model, docs, vocab=vocab, text_tokenizer=text_tok, image_tokenizer=image_tok,
                        batch_size=batch_size, device=device)
        out["history_ppl"] = {"with_history": h["with_history"]["ppl"], "without_history": h["without_history"]["ppl"],
                              "ratio": h["ratio"], "exchanges": h["exchanges"], "tokens": h["with_history"]["tokens"]}
    if drawing:
        if image_tok is None:
            raise ValueError("prompt-following needs the image tokenizer (to read the pictures drawn)")
        out["prompt_following"] = {}
        for name, prompts in drawing.items():
            r = prompt_following(model, prompts, vocab=vocab, text_tokenizer=text_tok, image_tokenizer=image_tok,
                                 seeds=seeds, config=config)
            if out_dir is not None:
                _picture_sheet(r["pictures"], Path(out_dir) / f"drawing-{name}.png", columns=len(seeds))
            out["prompt_following"][name] = {k: v for k, v in r.items() if k != "pictures"}
    return out


def evaluate_drawing(*, checkpoint: str, prompts: Sequence[Any], image_tokenizer: str, seeds: Sequence[int] = (0, 1),
                     config: Any = None, out_dir: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """``caption_following`` of one checkpoint on single-turn drawing ``prompts`` (``jam run``'s
    evaluation stage, every variant and the image-text parent; module-level, so a SLURM job can run
    it): the scores, the pictures written to ``out_dir/drawing-single.png`` (one row per prompt)."""
    from checkpoints_tools.load import load_model
    from jam_metaseq.data.tokenizers import load_text_tokenizer
    from jam_metaseq.image_tokenizer import load_image_tokenizer

    model, _, vocab = load_model(checkpoint, require_vocab=True, device=device)
    r = caption_following(model, prompts, vocab=vocab, text_tokenizer=load_text_tokenizer(vocab.text_tokenizer),
                          image_tokenizer=load_image_tokenizer(image_tokenizer, device=device), seeds=seeds,
                          config=config)
    if out_dir is not None:
        _picture_sheet(r["pictures"], Path(out_dir) / "drawing-single.png", columns=len(seeds))
    return {k: v for k, v in r.items() if k != "pictures"}

"""What ``jam-generate`` does, as a library: load a checkpoint and its vocabulary manifest, encode
prompts, generate in batches (paper §3.1 decoding), write JSON lines / Markdown / HTML + PNGs.

Checkpoints are loaded by ``checkpoints_tools.load_model`` (any layout the tools read:
consolidated, MP parts, FSDP shards, safetensors, HF OPT; pickles through its allow-list unless
``trust_pickle``). The manifest comes from ``--vocab``, else the checkpoint's own (stored in it,
else a ``vocab.json`` beside it).

Retrieval augmentation (``--retrieve BANK``; paper §3.1 "Retrieval Augmentation", as for the
retrieval-augmented samples): each text prompt is the query of the bank's dense retriever (CLIP
document vectors, MIPS, the diversity rules; no query dropout), and the retrieved documents are put
before the prompt text in the layout of ``retrieval/prefix.py``:

    [prompt prefix token]  doc_1 <eos> doc_2 <eos>  prompt text

The prompt prefix token (``<eos>`` by default) stays first, as ``prepend_retrieved`` keeps a leading
``<bos>``; the prompt text then follows an ``<eos>`` as a document does in the packed training data.
The retrieved prefix gets the room the context leaves: ``max_positions - max_new_tokens -
len(prompt)`` tokens, filled by the retrieval module's truncation rule (best document first, whole
documents while they fit, the first that does not cut outside images, later ones dropped); the prompt
is never cut. The unconditional CFG row (Eq. 6) keeps the same retrieved prefix and masks only the
prompt text (``<prompt prefix> docs <mask>``): the condition that guidance amplifies is the prompt,
not the retrieved context, so both rows see the same documents. Repetition-penalty bookkeeping
counts the retrieved tokens as prompt tokens. Each answer records the retrieved documents' ids,
scores and the tokens each contributed (0 = dropped by the truncation rule).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from jam_metaseq.inputs import INT64_MAX, InputError, check_int, check_int_list
from jam_metaseq.vocab import VocabManifest

from .answer import Answer
from .engine import Engine, GenerationConfig
from .render import attach_text, write_answer_set

PROMPT_PREFIXES = {"auto": "auto", "eos": "eos", "bos": "bos", "none": None, "turn": "turn"}
"""What comes before each text prompt (``--prompt-prefix``): ``eos`` (the document separator),
``bos``, nothing, or ``turn``: the prompt as a conversation's first user turn, ``<eos> <user> prompt
<eot> <assistant>``, answered until ``<eot>`` (docs/CONVERSATIONS.md; needs conversation tokens).
``auto``: ``turn`` when the manifest has conversation tokens, else ``eos``."""


@dataclass
class PromptSpec:
    """One prompt as read from the command line or a JSONL file."""

    text: str | None = None
    """Prompt text (encoded with the text tokenizer)."""
    ids: list[int] | None = None
    """Or vocabulary ids, used as given (no prefix added)."""
    seed: int | None = None
    """Seed of this prompt's random stream (default: --seed + its index)."""
    source: str = "<command line>"
    """Where it came from, for error messages."""


@dataclass
class RetrievalOptions:
    """What ``--retrieve`` puts before each prompt (paper §3.1 retrieval augmentation)."""

    bank_dir: str | Path
    """Memory bank directory written by ``jam-retrieval build``."""
    k: int = 2
    """Documents retrieved per prompt (the paper retrieves 2)."""
    score_threshold: float | None = 0.9
    """Relevance threshold of the diversity rule (skip candidates scoring above it); None = off."""
    clip_checkpoint: str | None = None
    """Local CLIP weights of the query encoder (default: the path recorded in the bank)."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"--retrieve-k must be >= 1, got {self.k}")


@dataclass
class RetrievalAnswer(Answer):
    """An answer whose prompt was prefixed with retrieved documents (``prompt_ids`` holds them)."""

    retrieval: dict[str, Any] = field(default_factory=dict)
    """``{"bank", "prefix_start", "prefix_len", "docs": [{"doc_id", "score", "row", "prefix_tokens"}]}``:
    the prefix is ``prompt_ids[prefix_start : prefix_start + prefix_len]``; ``prefix_tokens`` is what
    each document put into it, separator included (0 = dropped by the truncation rule)."""

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "retrieval": self.retrieval}


def read_prompts_jsonl(path: str | Path) -> list[PromptSpec]:
    """Lines ``{"prompt": str}`` or ``{"prompt_ids": [int, ...]}``, optional ``"seed"``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    from jam_metaseq.data.documents import DocumentError, parse_jsonl_line

    specs = []
    for n, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            d = parse_jsonl_line(line)
        except DocumentError as e:
            raise e.at(where) from None
        if not isinstance(d, dict) or ("prompt" in d) == ("prompt_ids" in d):
            raise ValueError(f"{where}: expected an object with exactly one of 'prompt' or 'prompt_ids'")
        text, ids = d.get("prompt"), d.get("prompt_ids")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{where}: 'prompt' must be a string")
        if ids is not None:
            if not (isinstance(ids, list) and ids):
                raise ValueError(f"{where}: 'prompt_ids' must be a non-empty list of integers")
            try:  # Python ints checked before torch sees them (2**63 would overflow); the vocabulary's
                # range is the engine's check
                ids = check_int_list(ids, lo=0, hi=INT64_MAX, what="prompt_ids").tolist()
            except InputError as e:
                raise ValueError(f"{where}: {e.detail}") from None
        seed = d.get("seed")
        if seed is not None:
            try:
                seed = check_int(seed, name="'seed'", lo=0, hi=INT64_MAX)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        specs.append(PromptSpec(text=text, ids=ids, seed=seed, source=where))
    if not specs:
        raise ValueError(f"{path}: no prompts")
    return specs


def resolve_prefix(prefix: str | None, *, vocab: VocabManifest) -> str | None:
    """``auto`` -> ``turn`` with conversation tokens, else ``eos`` (``PROMPT_PREFIXES``)."""
    if prefix == "auto":
        return "turn" if vocab.conversation_tokens else "eos"
    if prefix == "turn" and not vocab.conversation_tokens:
        raise ValueError("--prompt-prefix turn needs a vocabulary with conversation tokens")
    return prefix


def encode_prompts(
    specs: Sequence[PromptSpec], *, vocab: VocabManifest, tokenizer: Any | None, prefix: str | None = "eos",
) -> list[list[int]]:
    """Text -> [prefix] + (tokenizer ids + text_start), or with ``prefix="turn"`` the conversation's
    first user turn ``<eos> <user> ids <eot> <assistant>`` (``conversation.turn_prompt``);
    ``prompt_ids`` pass through unchanged.

    The default prefix is ``<eos>``: the data pipeline separates documents with ``<eos>`` (no
    ``<s>``), so an answer starts where a training document starts.
    """
    from .conversation import turn_prompt

    out = []
    for s in specs:
        if s.ids is not None:
            out.append(list(s.ids))
            continue
        if tokenizer is None:
            raise ValueError(f"{s.source}: a text prompt needs --tokenizer (or the manifest's text_tokenizer)")
        ids = [vocab.text_start + i for i in tokenizer.encode(s.text or "")]
        bad = [i for i in ids if not vocab.is_text(i)]
        if bad:
            raise ValueError(
                f"{s.source}: the tokenizer gives ids beyond the manifest's text_size {vocab.text_size}"
            )
        if prefix == "turn":
            out.append([vocab.eos] + turn_prompt(ids, vocab=vocab))
            continue
        head = [] if prefix is None else [vocab.eos if prefix == "eos" else vocab.bos]
        out.append(head + ids)
    return out


def load_retriever(options: RetrievalOptions, *, vocab: VocabManifest, device: str = "cpu",
                   trust_pickle: bool = False):
    """The bank's ``Retriever`` with its CLIP query encoder; checks the bank's vocabulary manifest.

    Without ``clip_checkpoint`` and without weights recorded in the bank the encoder is randomly
    initialised (the bank's ``init_seed``): a warning is issued, as retrieval is then only
    meaningful against a bank built with the same random weights (smoke tests).
    """
    from jam_metaseq.retrieval.bank import MemoryBank
    from jam_metaseq.retrieval.retriever import Retriever, RetrieverConfig

    bank = MemoryBank.load(options.bank_dir)
    if bank.vocab is not None and bank.vocab != vocab:
        raise ValueError(
            f"{bank.path}: the bank's vocab manifest ({bank.vocab.size} ids) differs from the model's "
            f"({vocab.size} ids): rebuild the bank with the model's manifest"
        )
    recorded = dict(bank.manifest.get("encoder", {})).get("checkpoint")
    if options.clip_checkpoint is None and recorded is None:
        warnings.warn(
            f"no CLIP weights (--clip-checkpoint, or a checkpoint recorded in {bank.path}): the query "
            "encoder is randomly initialised; retrieval is meaningless unless the bank was built with "
            "the same random weights", stacklevel=2,
        )
    config = RetrieverConfig(k=options.k, score_threshold=options.score_threshold)
    return Retriever.from_bank_dir(bank.path, config=config, with_encoder=True,
                                   clip_checkpoint=options.clip_checkpoint, device=device,
                                   trust_pickle=trust_pickle)


def prefix_retrieved(
    specs: Sequence[PromptSpec], ids: Sequence[Sequence[int]], *, retriever: Any, vocab: VocabManifest,
    max_positions: int, max_new_tokens: int, prompt_prefix: str | None = "eos", progress: bool = False,
) -> tuple[list[list[int]], list[list[int]], list[dict[str, Any]]]:
    """Retrieve for each text prompt and lay out ``[head] docs prompt`` (module docstring).

    ``ids``: the encoded prompts (``encode_prompts``). Returns the conditional prompts, the
    unconditional CFG rows (``[head] docs <mask>``) and one retrieval record per prompt.
    """
    from jam_metaseq.retrieval.prefix import build_retrieval_prefix
    from jam_metaseq.retrieval.retriever import retrieval_prefix_for_prompt

    from .cfg import unconditional_prompt

    head_len = 0 if prompt_prefix is None else 1
    cond, uncond, records = [], [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), desc="retrieving", unit="prompt", file=sys.stderr)
    for s, p in zip(specs, ids):
        if s.ids is not None or s.text is None:
            raise ValueError(f"{s.source}: --retrieve needs a text prompt (the retrieval query), not prompt_ids")
        # The prompt plus max_new_tokens must still fit the context; the prefix gets what is left.
        room = max(0, max_positions - max_new_tokens - len(p))
        prefix, docs = retrieval_prefix_for_prompt(retriever, prompt_text=s.text, vocab=vocab, max_len=room)
        prefix = [int(t) for t in prefix]
        # What each document contributed: the rule is greedy in rank order, so the prefix of the
        # first j documents is a prefix of the prefix of the first j + 1.
        sizes = [build_retrieval_prefix([d.tokens for d in docs[:j]], vocab=vocab, max_len=room).size
                 for j in range(len(docs) + 1)]
        head, rest = list(p[:head_len]), list(p[head_len:])
        cond.append(head + prefix + rest)
        uncond.append(head + prefix + unconditional_prompt(rest, vocab=vocab))
        records.append({
            "bank": str(retriever.bank.path), "prefix_start": head_len, "prefix_len": len(prefix),
            "docs": [{"doc_id": d.doc_id, "score": float(d.score), "row": int(d.row),
                      "prefix_tokens": int(sizes[j + 1] - sizes[j])} for j, d in enumerate(docs)],
        })
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return cond, uncond, records


def generate_answers(
    *, checkpoint: str | Path, prompts: Sequence[PromptSpec], config: GenerationConfig,
    vocab_path: str | Path | None = None, tokenizer: str | None = None,
    image_tokenizer: str | None = None, out_dir: str | Path | None = None, batch_size: int = 8,
    device: str = "cpu", dtype: torch.dtype = torch.float32, prompt_prefix: str | None = "auto",
    progress: bool = True, retrieval: RetrievalOptions | None = None, decode: str = "auto",
    trust_pickle: bool = False,
) -> list[Answer]:
    """Everything ``jam-generate`` does; returns the answers (and writes files under ``out_dir``).

    ``decode``: the engine's decode mode (``Engine(decode=...)``: eager, static or graph; ``auto``
    = graph on CUDA, eager elsewhere).

    ``prompt_prefix``: ``PROMPT_PREFIXES``' values; with ``turn`` (``auto`` on a model with
    conversation tokens) each answer ends at ``<eot>``, as a chat's first answer.

    ``retrieval``: prefix each text prompt with documents retrieved from a memory bank (module
    docstring); the answers are then ``RetrievalAnswer``s recording them.

    ``trust_pickle``: for every checkpoint loaded (model, image tokenizer, CLIP weights), unpickle
    globals outside the loader's allow-list (``--trust-pickle``; only for trusted files).
    """
    if retrieval is not None:
        for s in prompts:  # fail before loading anything
            if s.ids is not None or s.text is None:
                raise ValueError(f"{s.source}: --retrieve needs a text prompt (the retrieval query), not prompt_ids")
    from checkpoints_tools.load import load_model

    model, _, vocab = load_model(checkpoint, vocab=vocab_path, require_vocab=True, dtype=dtype, device=device,
                                 trust_pickle=trust_pickle)
    tok = None
    spec = tokenizer or vocab.text_tokenizer
    if spec is not None:
        from jam_metaseq.data.tokenizers import load_text_tokenizer

        tok = load_text_tokenizer(spec)
    decoder = None
    if image_tokenizer is not None:
        from jam_metaseq.image_tokenizer import load_image_tokenizer

        decoder = load_image_tokenizer(image_tokenizer, device=device, trust_pickle=trust_pickle)
        if tuple(decoder.grid) != tuple(vocab.image_grid) or decoder.n_codes != vocab.image_codes:
            raise ValueError(
                f"image tokenizer {image_tokenizer} has a {tuple(decoder.grid)} grid of {decoder.n_codes} codes "
                f"but the manifest says {tuple(vocab.image_grid)} and {vocab.image_codes}"
            )
    prompt_prefix = resolve_prefix(prompt_prefix, vocab=vocab)
    if prompt_prefix == "turn":
        import dataclasses

        config = dataclasses.replace(config, end_id=vocab.eot)
    ids = encode_prompts(prompts, vocab=vocab, tokenizer=tok, prefix=prompt_prefix)
    seeds = [s.seed if s.seed is not None else config.seed + i for i, s in enumerate(prompts)]
    uncond: list[list[int]] | None = None
    records: list[dict[str, Any]] | None = None
    if retrieval is not None:
        retriever = load_retriever(retrieval, vocab=vocab, device=device, trust_pickle=trust_pickle)
        ids, uncond, records = prefix_retrieved(
            prompts, ids, retriever=retriever, vocab=vocab, max_positions=model.cfg.max_positions,
            max_new_tokens=config.max_new_tokens, prompt_prefix=prompt_prefix, progress=progress,
        )
    if decode == "auto":
        decode = "graph" if torch.device(device).type == "cuda" else "eager"
    engine = Engine(model, vocab=vocab, decode=decode)
    answers: list[Answer] = []
    for start in range(0, len(ids), batch_size):
        answers += engine.generate(
            ids[start : start + batch_size], config=config, seeds=seeds[start : start + batch_size],
            progress=progress, unconditional=None if uncond is None else uncond[start : start + batch_size],
        )
    if records is not None:
        answers = [RetrievalAnswer(**{f.name: getattr(a, f.name) for f in fields(Answer)}, retrieval=r)
                   for a, r in zip(answers, records)]
    for a, s in zip(answers, prompts):
        a.prompt = s.text
    if tok is not None:
        attach_text(answers, tokenizer=tok)
    if out_dir is not None:
        write_answer_set(answers, out_dir=out_dir, image_decoder=decoder)
    return answers

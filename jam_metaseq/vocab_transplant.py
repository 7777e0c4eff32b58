"""Vocabulary transplant (issue 24 item 3): re-express a model's embedding and output rows in
another text tokenizer, so that parents with different tokenizers (Llama-2: 32,000 ids, Llama-3:
128,256, Chameleon: 65,536) can read one token stream.

The rule, per id of the new tokenizer (``plan_text``):

1. **copied**: an id whose string exists in the old tokenizer (the same bytes, or the same special
   token name) takes that id's rows unchanged;
2. **composed**: any other id's bytes are cut into the old tokenizer's pieces, the fewest pieces
   that spell them (ties: the longest first piece), and its row is built from those pieces' rows by
   the rule: ``weighted`` (the default) = a weighted mean, input rows weighing the k-th of n pieces
   k and output rows n + 1 - k (mergekit tokensurgeon's ``subword`` / ``weighted_mean`` idea: what
   the model has just read is the last piece, what it is about to write begins with the first); a
   tied tensor, being both, takes the plain mean; ``mean`` = the plain mean, FVT (Gee et al., 2022,
   "Fast Vocabulary Transfer");
3. **fallback**: an id no pieces spell (a special token the old tokenizer lacks, a byte it cannot
   write) gets the mean of the old text rows (``vocab_rows``' ``text_mean``, Hewitt 2021).

FOCUS (Dobler & de Melo, 2023) and WECHSEL (Minixhofer et al., 2022) weight the overlapping tokens
by similarity in auxiliary fastText / bilingual embeddings; tokensurgeon's default interpolates
from a donor model's embedding of the same vocabulary. Both need a second model of the new
tokenizer, which a JAM user fusing two parents does not have for the text side; the pieces are
available for every id. The rules were measured on a model trained here, in bits per byte, against
random composed rows and against the pieces' first / last row alone (tokensurgeon's
``first_last``, which is worse on real text: every new token sharing a first piece gets its full
logit): docs/FAMILIES.md, "Chameleon and different tokenizers"; ``benchmarks/bench_transplant.py``.

Pieces are found on bytes (``TextTokenizer.token_bytes``), so any two of our tokenizer kinds
(byte-level BPE JSON, sentencepiece, Metaspace JSON, bytes) transplant into each other: a ``▁`` and
a ``Ġ`` both mean a space, a byte-fallback ``<0xE2>`` one byte.

In a checkpoint the text ids sit inside the vocabulary manifest's layout (``jam_metaseq.vocab``):
``plan_rows`` keeps every non-text id's row (specials, image codes, ``<break>``, sentinels,
``<eoss>``, conversation tokens; shifted by the change in text size) and sets filler rows by
``text_mean``; ``transplant_state_dict`` applies it to every tensor the key schema splits by
vocabulary rows (the embedding, the output projection, JAM-Cross's branch embeddings), a tied
projection staying tied.

Public API::

    plan_text(old_tokens, new_tokens) -> TextPlan                # token_bytes() of each tokenizer
    plan_rows(text, *, old, new) -> RowPlan                      # old / new VocabManifest
    transplant_rows(tensor (old.size, E), plan, *, rule="weighted", role="tied") -> (new.size, E)
    transplant_state_dict(state, plan, *, rule="weighted") -> dict   # roles from the keys
    transplanted_vocab(old, *, text_size, text_tokenizer) -> VocabManifest
    transplant_record(plan, *, rule) -> dict                     # what the manifest records
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from jam_metaseq.models import keys
from jam_metaseq.vocab import VocabManifest
from jam_metaseq.vocab_rows import ROW_INIT_RULES

RULES = {
    "weighted": "a weighted mean of the old tokenizer's pieces' rows: input rows weigh the k-th of n pieces k, "
                "output rows n + 1 - k (the last piece read, the first piece written, count most; a tied tensor: "
                "the plain mean)",
    "mean": "the plain mean of the old tokenizer's pieces' rows (FVT)",
}
"""``rule`` -> how a composed row is built (copied rows are copied and fallback rows are the mean of
the old text rows under every rule)."""
DEFAULT_RULE = "weighted"
_CHUNK = 4096
"""New rows composed per step: bounds the temporaries to ~ chunk x pieces x E floats."""


@dataclass(frozen=True)
class TextPlan:
    """Where each new text id's rows come from (ids are tokenizer ids, 0-based)."""

    source: tuple[int, ...]
    """Per new id: the old id it copies, or -1."""
    pieces: tuple[tuple[int, ...], ...]
    """Per new id: the old ids whose rows compose it (empty when copied or a fallback)."""
    old_size: int
    """Ids of the old tokenizer."""

    @property
    def copied(self) -> int:
        return sum(s >= 0 for s in self.source)

    @property
    def composed(self) -> int:
        return sum(bool(p) for p in self.pieces)

    @property
    def fallback(self) -> int:
        return len(self.source) - self.copied - self.composed


def _segment(text: bytes, index: Mapping[bytes, int], longest: int) -> tuple[int, ...]:
    """The fewest old pieces whose bytes concatenate to ``text`` (ties: the longest first piece,
    then recursively); () when none do."""
    n = len(text)
    INF = n + 1
    cost = [INF] * (n + 1)
    take = [0] * (n + 1)
    cost[n] = 0
    for i in range(n - 1, -1, -1):
        for length in range(min(longest, n - i), 0, -1):  # longest first: it keeps ties
            if cost[i + length] + 1 < cost[i] and text[i:i + length] in index:
                cost[i], take[i] = cost[i + length] + 1, length
    if cost[0] >= INF:
        return ()
    out, i = [], 0
    while i < n:
        out.append(index[text[i:i + take[i]]])
        i += take[i]
    return tuple(out)


def plan_text(old_tokens: Sequence[bytes | str], new_tokens: Sequence[bytes | str]) -> TextPlan:
    """The transplant of every new id (module docstring, rules 1-3), from each tokenizer's
    ``token_bytes()`` (bytes: the text an id stands for; str: a special token's name)."""
    index: dict[bytes | str, int] = {}
    for i, t in enumerate(old_tokens):
        index.setdefault(t, i)  # the first id of a duplicated string
    text_index = {t: i for t, i in index.items() if isinstance(t, bytes) and t}
    longest = max((len(t) for t in text_index), default=0)
    source, pieces = [], []
    for t in new_tokens:
        if t in index and t != b"":
            source.append(index[t])
            pieces.append(())
        else:
            source.append(-1)
            pieces.append(_segment(t, text_index, longest) if isinstance(t, bytes) and t else ())
    return TextPlan(source=tuple(source), pieces=tuple(pieces), old_size=len(old_tokens))


@dataclass(frozen=True)
class RowPlan:
    """A ``TextPlan`` placed in two vocabulary manifests: where each row of ``new.size`` comes from."""

    text: TextPlan
    old: VocabManifest
    new: VocabManifest
    source: torch.Tensor
    """(new.size,) int64: the old row copied, or -1 (composed, fallback or filler)."""


def transplanted_vocab(old: VocabManifest, *, text_size: int, text_tokenizer: str | None) -> VocabManifest:
    """``old`` with another text tokenizer: every other field (image codes, sentinels, grid,
    conversation tokens, padding multiple) kept, so every non-text id keeps its meaning."""
    return dataclasses.replace(old, text_size=text_size, text_tokenizer=text_tokenizer)


def plan_rows(text: TextPlan, *, old: VocabManifest, new: VocabManifest) -> RowPlan:
    """Rows of ``new`` from rows of ``old``: the four specials and every id after the text range
    copied (shifted by the change in text size), text ids by ``text``, filler rows left to the rule.
    Where either manifest has explicit ids (an imported parent: a Llama LLM moved into a Chameleon
    image parent's vocabulary), ``new`` is the target's own manifest and rows follow roles
    (``plan_rows_by_role``)."""
    if old.explicit_ids is not None or new.explicit_ids is not None:
        return plan_rows_by_role(text, old=old, new=new)
    same = [f.name for f in dataclasses.fields(old) if f.name not in ("text_size", "text_tokenizer")
            and getattr(old, f.name) != getattr(new, f.name)]
    if same:
        raise ValueError(f"the new vocabulary differs from the old one in {', '.join(same)} (a transplant "
                         "changes the text tokenizer only)")
    if (text.old_size, len(text.source)) != (old.text_size, new.text_size):
        raise ValueError(f"the tokenizers have {text.old_size} and {len(text.source)} ids, the manifests' text "
                         f"ranges {old.text_size} and {new.text_size}")
    source = torch.full((new.size,), -1, dtype=torch.long)
    source[:new.text_start] = torch.arange(new.text_start)
    src = torch.tensor(text.source, dtype=torch.long)
    source[new.text_start:new.text_end] = torch.where(src >= 0, src + old.text_start, src)
    after = new.num_used - new.text_end  # image codes, <break>, sentinels, <eoss>, conversation tokens
    source[new.text_end:new.num_used] = torch.arange(old.text_end, old.text_end + after)
    return RowPlan(text=text, old=old, new=new, source=source)


def plan_rows_by_role(text: TextPlan, *, old: VocabManifest, new: VocabManifest) -> RowPlan:
    """Rows of ``new`` (any manifest, e.g. a Chameleon parent's) from ``old`` (any): each text id of
    ``new`` (``is_text``) by ``text``; bos / pad / eos / unk, ``<break>`` (image begin), the image end,
    ``<eoss>``, the sentinels and the image codes (code c to code c) from ``old``'s ids of the same
    role where ``old`` has as many; every other row (an image code a text LLM lacks, a reserved id)
    is left to the fallback (the mean of ``old``'s text rows)."""
    if (text.old_size, len(text.source)) != (old.text_size, new.text_size):
        raise ValueError(f"the tokenizers have {text.old_size} and {len(text.source)} ids, the manifests' text "
                         f"ranges {old.text_size} and {new.text_size}")
    source = torch.full((new.size,), -1, dtype=torch.long)
    ids = torch.arange(new.text_start, new.text_end)
    is_text = torch.as_tensor(new.is_text(ids), dtype=torch.bool)
    src = torch.tensor(text.source, dtype=torch.long)
    source[ids[is_text]] = torch.where(src >= 0, src + old.text_start, src)[is_text]
    for name in ("bos", "pad", "eos", "unk", "boi", "eoi", "eoss"):
        source[getattr(new, name)] = getattr(old, name)
    if old.num_sentinels == new.num_sentinels:
        source[new.sentinel_start:new.sentinel_end] = torch.arange(old.sentinel_start, old.sentinel_end)
    if old.image_codes == new.image_codes and new.image_codes:
        codes = torch.arange(new.image_codes)
        source[torch.as_tensor(new.image_id(codes))] = torch.as_tensor(old.image_id(codes))
    return RowPlan(text=text, old=old, new=new, source=source)


ROLES = ("input", "output", "tied")
"""What a vocabulary tensor is: an input embedding, an output projection, or one tensor that is both."""


def role_of(key: str, *, tied: bool) -> str:
    """The ``ROLES`` entry of vocabulary tensor ``key`` (``tied``: the embedding is the output projection)."""
    if tied:
        return "tied"
    return "output" if key == keys.OUTPUT else "input"


def transplant_rows(tensor: torch.Tensor, plan: RowPlan, *, rule: str = DEFAULT_RULE, role: str = "tied") -> torch.Tensor:
    """(old.size, E) vocabulary rows -> (new.size, E) by ``plan`` and ``rule`` (``RULES``), composed in
    fp32 and cast back to the tensor's dtype; ``role`` (``ROLES``) matters to ``weighted`` only."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if rule not in RULES:
        raise ValueError(f"unknown transplant rule {rule!r}; expected one of {', '.join(RULES)}")
    old, new = plan.old, plan.new
    if tensor.dim() != 2 or tensor.shape[0] != old.size:
        raise ValueError(f"expected ({old.size}, E) vocabulary rows for the old manifest, got {tuple(tensor.shape)}")
    E = tensor.shape[1]
    out = torch.empty((new.size, E), dtype=tensor.dtype)
    copy = plan.source >= 0
    out[copy] = tensor[plan.source[copy]]
    out[~copy] = ROW_INIT_RULES["text_mean"](tensor, old)
    pieces = [(new.text_start + j, p) for j, p in enumerate(plan.text.pieces)
              if p and plan.source[new.text_start + j] < 0]  # (a row of a role is copied, not composed)
    for s in range(0, len(pieces), _CHUNK):
        chunk = pieces[s:s + _CHUNK]
        rows = torch.tensor([r for r, _ in chunk])
        flat = torch.tensor([old.text_start + i for _, p in chunk for i in p])
        owner = torch.repeat_interleave(torch.arange(len(chunk)), torch.tensor([len(p) for _, p in chunk]))
        n = torch.tensor([len(p) for _, p in chunk])
        k = torch.cat([torch.arange(1, len(p) + 1) for _, p in chunk])  # 1-based place of each piece
        if rule == "weighted" and role == "input":
            w = k.float()
        elif rule == "weighted" and role == "output":
            w = (n[owner] + 1 - k).float()
        else:
            w = torch.ones(len(flat))
        total = torch.zeros(len(chunk)).index_add_(0, owner, w)[:, None]
        rows_sum = torch.zeros(len(chunk), E).index_add_(0, owner, tensor[flat].float() * w[:, None])
        out[rows] = (rows_sum / total).to(tensor.dtype)
    return out


def transplant_state_dict(state: Mapping[str, torch.Tensor], plan: RowPlan, *,
                          rule: str = DEFAULT_RULE) -> dict[str, torch.Tensor]:
    """``transplant_rows`` on every key the key schema splits by vocabulary rows; tensors that were
    one (a tied output projection) stay one. Other keys pass through."""
    out: dict[str, torch.Tensor] = {}
    done: dict[tuple, torch.Tensor] = {}  # the source's memory -> its transplant (ties share memory)
    where = {k: (t.device, t.data_ptr(), tuple(t.shape), t.stride()) for k, t in state.items()}
    tied = keys.EMBED in state and keys.OUTPUT in state and where[keys.EMBED] == where[keys.OUTPUT]
    for key, t in state.items():
        if keys.rule_for(key) != "vocab":
            out[key] = t
            continue
        if where[key] not in done:
            done[where[key]] = transplant_rows(t, plan, rule=rule, role=role_of(key, tied=tied))
        out[key] = done[where[key]]
    return out


def transplant_record(plan: RowPlan, *, rule: str) -> dict:
    """What a transplanted checkpoint's manifest records: the rule and how each text id was made."""
    text = plan.text
    n = len(text.source)
    composed = [len(p) for p in text.pieces if p]
    return {
        "rule": rule, "rule_text": RULES[rule], "fallback_rule": "mean of the old text rows",
        "from_tokenizer": plan.old.text_tokenizer, "to_tokenizer": plan.new.text_tokenizer,
        "text_ids": n, "copied": text.copied, "composed": text.composed, "fallback": text.fallback,
        "copied_share": round(text.copied / n, 6) if n else 0.0,
        "mean_pieces": round(sum(composed) / len(composed), 4) if composed else 0.0,
        "old_size": plan.old.size, "new_size": plan.new.size,
    }

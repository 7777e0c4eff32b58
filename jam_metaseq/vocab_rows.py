"""The rows a checkpoint's vocabulary tensors gain when its manifest grows, and how they start.

A manifest made with ``conversation_tokens`` (docs/CONVERSATIONS.md) has three more used ids than
the same manifest without them: ``<user>``, ``<assistant>`` and ``<eot>`` right after ``<eoss>``.
Every earlier id keeps its place, so a trained checkpoint takes them by giving each tensor whose
rows are vocabulary ids (the key schema's ``vocab`` rule: the token embedding, the output
projection, JAM-Cross's per-branch embeddings) the rows [old.num_used, new.size):

- rows below ``old.num_used`` are copied unchanged (the model is the same function on old ids);
- every other row (the new ids, and filler rows that had no meaning) is set by the init rule.

The rule, ``text_mean``: each added row is the mean of the same tensor's text rows
[text_start, text_end). As an input row it is a typical text embedding (no outlier norm); as an
output row its logit is the average text logit, so a new token starts with about the probability of
an average word instead of a random one (Hewitt, 2021, "Initializing new word embeddings for
pretrained language models"). One rule for every vocab tensor, so a tied projection stays tied.

``jam-ckpt extend-vocab`` (``checkpoints_tools/ops/extend_vocab.py``) applies ``extend_rows`` to a
checkpoint on disk tensor by tensor and writes ``rows_record`` into its ``manifest.json``; ``jam
run``'s instruct stage uses it when a model must learn the conversation tokens.

Public API::

    added_ids(old, new) -> range                      # ids whose rows the rule sets
    extend_rows(tensor (V_old, E), *, old, new, rule="text_mean") -> (V_new, E)
    extend_state_dict(state, *, old, new, rule="text_mean") -> dict   # every vocab-rule key
    rows_record(old, new, *, rule="text_mean") -> dict                # what the manifest records
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from jam_metaseq.models import keys
from jam_metaseq.vocab import VocabManifest


def _text_mean(tensor: torch.Tensor, vocab: VocabManifest) -> torch.Tensor:
    """(E,) the mean of the text rows, in float32 then cast back."""
    rows = tensor[vocab.text_start:vocab.text_end]
    if rows.shape[0] == 0:
        raise ValueError("the text_mean rule needs text rows: the vocabulary has text_size 0")
    return rows.float().mean(dim=0).to(tensor.dtype)


ROW_INIT_RULES: dict[str, Callable[[torch.Tensor, VocabManifest], torch.Tensor]] = {"text_mean": _text_mean}
"""rule name -> ``(old tensor, old manifest) -> (E,)`` value of every added row."""


def added_ids(old: VocabManifest, new: VocabManifest) -> range:
    """The rows ``new`` gives a meaning (or a place) that ``old`` did not: [old.num_used, new.size).

    ``new`` must extend ``old``: the same fields but ``conversation_tokens`` (and the informational
    ``text_tokenizer``), so every id below ``old.num_used`` means the same in both."""
    diff = new.layout_differences(old)
    if diff:
        raise ValueError(f"the new vocabulary does not extend the old one: {', '.join(diff)} differ "
                         "(only conversation tokens may be added)")
    if not new.extends(old):
        raise ValueError("the new vocabulary drops the conversation tokens of the old one")
    return range(old.num_used, new.size)


def extend_rows(tensor: torch.Tensor, *, old: VocabManifest, new: VocabManifest,
                rule: str = "text_mean") -> torch.Tensor:
    """(old.size, E) vocabulary rows -> (new.size, E): old used rows copied, the rest set by ``rule``."""
    if rule not in ROW_INIT_RULES:
        raise ValueError(f"unknown row init rule {rule!r}; expected one of {sorted(ROW_INIT_RULES)}")
    if tensor.dim() != 2 or tensor.shape[0] != old.size:
        raise ValueError(f"expected ({old.size}, E) vocabulary rows for the old manifest, got {tuple(tensor.shape)}")
    ids = added_ids(old, new)
    out = torch.empty((new.size, tensor.shape[1]), dtype=tensor.dtype, device=tensor.device)
    out[:old.num_used] = tensor[:old.num_used]
    out[ids.start:ids.stop] = ROW_INIT_RULES[rule](tensor, old)
    return out


def extend_state_dict(state: Mapping[str, torch.Tensor], *, old: VocabManifest, new: VocabManifest,
                      rule: str = "text_mean") -> dict[str, torch.Tensor]:
    """``extend_rows`` on every key the key schema splits by vocabulary rows; tensors that were one
    (a tied output projection) stay one. Other keys pass through."""
    out: dict[str, torch.Tensor] = {}
    done: dict[tuple, torch.Tensor] = {}  # the source's memory -> its extension (ties share memory)
    for key, t in state.items():
        if keys.rule_for(key) != "vocab":
            out[key] = t
            continue
        where = (t.device, t.data_ptr(), tuple(t.shape), t.stride())
        if where not in done:
            done[where] = extend_rows(t, old=old, new=new, rule=rule)
        out[key] = done[where]
    return out


def rows_record(old: VocabManifest, new: VocabManifest, *, rule: str = "text_mean") -> dict:
    """What a checkpoint's manifest records about the rows it gained."""
    ids = added_ids(old, new)
    named = {}
    if new.conversation_tokens and not old.conversation_tokens:
        named = {"<user>": new.user_id, "<assistant>": new.assistant_id, "<eot>": new.eot}
    return {"rows": [ids.start, ids.stop], "old_size": old.size, "new_size": new.size, "tokens": named,
            "init": rule, "init_rule": "mean of the tensor's text rows [text_start, text_end)"}

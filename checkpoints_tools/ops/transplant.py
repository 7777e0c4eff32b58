"""Vocabulary transplant (``jam-ckpt transplant``, issue 24 item 3): a model re-expressed in another
text tokenizer, streamed tensor by tensor: the vocabulary rows (embedding, output projection) by
``jam_metaseq.vocab_transplant``'s rule, every other tensor copied bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch

from checkpoints_tools.io.output_dir import OutputDir
from checkpoints_tools.ops import stream
from checkpoints_tools.ops.options import CommonOptions, manifest_extra
from checkpoints_tools.ops.parents import check_parent_tensors, expected_shapes, input_paths, parents_vocab
from checkpoints_tools.ops.provenance import source_record
from checkpoints_tools.readers import open_checkpoint
from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.data.tokenizers import load_text_tokenizer
from jam_metaseq.models import keys
from jam_metaseq.models.config import CrossConfig
from jam_metaseq.vocab import VocabManifest
from jam_metaseq.vocab_transplant import (
    DEFAULT_RULE, plan_rows, plan_text, role_of, transplant_record, transplant_rows, transplanted_vocab,
)


def transplant(src: str | os.PathLike, *, to_tokenizer: str, opts: CommonOptions, from_tokenizer: str | None = None,
               rule: str = DEFAULT_RULE, heads: int | None = None, to_vocab: VocabManifest | None = None) -> Path:
    """``src`` (a decoder with a vocabulary manifest: its own, or ``opts.vocab``) with its text ids
    those of ``to_tokenizer``; the old tokenizer is ``from_tokenizer`` or the one its manifest names.
    The output's manifest is ``to_vocab`` (another model's whole vocabulary, e.g. a Chameleon image
    parent's: rows by role, ``plan_rows_by_role``), else the old one with the new text range;
    ``manifest.json`` records the rule and the share of ids copied exactly."""
    r = open_checkpoint(src, trust_pickle=opts.trust_pickle, replica_mismatch=opts.replica_mismatch)
    cfg = r.config(**({"heads": heads} if heads else {}))
    if isinstance(cfg, CrossConfig):
        raise CheckpointError(f"{r.path}: a JAM-Cross model; transplant a parent before fusing it")
    check_parent_tensors(r, cfg, role="the")
    old = parents_vocab(opts.vocab, [r])
    if old is None:
        raise CheckpointError(f"{r.path}: no vocabulary manifest in or beside the checkpoint; give it with --vocab")
    try:
        old.check_embedding(cfg.vocab_size, what=str(r.path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if to_vocab is None and old.explicit_ids is None and cfg.padding_idx >= old.text_start:
        raise CheckpointError(f"{r.path}: padding_idx {cfg.padding_idx} is a text id; only manifests whose pad is "
                              f"among the first {old.text_start} ids transplant")
    source_tok = from_tokenizer or old.text_tokenizer
    if not source_tok:
        raise CheckpointError(f"{r.path}: its vocabulary manifest names no text tokenizer; give it with "
                              "--from-tokenizer")
    old_tok, new_tok = load_text_tokenizer(source_tok), load_text_tokenizer(to_tokenizer)
    if old_tok.vocab_size != old.text_size:
        raise CheckpointError(f"{source_tok}: {old_tok.vocab_size} ids, but the manifest of {r.path} has "
                              f"text_size {old.text_size}: not the model's tokenizer")
    new = to_vocab or transplanted_vocab(old, text_size=new_tok.vocab_size, text_tokenizer=new_tok.spec)
    if new_tok.vocab_size != new.text_size:
        raise CheckpointError(f"{to_tokenizer}: {new_tok.vocab_size} ids, but the new vocabulary has text_size "
                              f"{new.text_size}: not its tokenizer")
    try:
        plan = plan_rows(plan_text(old_tok.token_bytes(), new_tok.token_bytes()), old=old, new=new)
    except ValueError as e:
        raise CheckpointError(f"{r.path}: {e}") from None
    record = transplant_record(plan, rule=rule)
    new_cfg = dataclasses.replace(cfg, vocab_size=new.size, padding_idx=new.pad)
    shapes = expected_shapes(new_cfg)
    out = OutputDir(dataclasses.replace(opts.spec, dtype=opts.spec.dtype or r.param_dtype), cfg=new_cfg,
                    shapes=shapes, vocab=new.to_dict(), inputs=input_paths([r]))
    if opts.progress:
        print(f"transplant: {record['copied']} of {record['text_ids']} text ids copied "
              f"({100 * record['copied_share']:.1f}%), {record['composed']} composed ({rule}), "
              f"{record['fallback']} fallback", file=sys.stderr)

    tied = r.tied(*keys.TIED)

    def produce(name: str, buf: torch.Tensor) -> torch.Tensor:
        if keys.rule_for(name) == "vocab":
            return buf.copy_(transplant_rows(r.get(name), plan, rule=rule, role=role_of(name, tied=tied)))
        return r.get_into(name, buf)

    extra = manifest_extra(opts, "transplant", [source_record("source", r, hash_sources=opts.hash_sources)],
                           rule=rule, to_tokenizer=new_tok.spec, from_tokenizer=old_tok.spec)
    extra["transplant"] = record
    return stream.stream_to(out, produce, produced_dtypes={n: r.info(n).dtype for n in shapes},
                            desc="transplant", progress=opts.progress, threads=opts.threads, manifest_extra=extra,
                            tied=tied)

"""A checkpoint's vocabulary grown (``jam-ckpt extend-vocab``; issue 25, docs/CONVERSATIONS.md):
every tensor whose rows are vocabulary ids (the key schema's ``vocab`` rule: the token embedding,
the output projection, JAM-Cross's per-branch embeddings) gets the rows the new manifest adds,
set by ``jam_metaseq.vocab_rows`` (rows below the old manifest's ``num_used`` copied, the others
the mean of the tensor's text rows); every other tensor is copied bit for bit. The new manifest
must extend the checkpoint's own (``VocabManifest.extends``: today, the conversation tokens
added), so the output is the same function on every old id.

Streamed tensor by tensor like every operation (``stream.stream_to``: atomic output, nothing left
behind on an error); a tied output projection stays tied (one rule on both, aliased where the
layout aliases it). The output's ``manifest.json`` records the rows (``vocab_rows.rows_record``)
under ``vocab_rows``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from checkpoints_tools.io.output_dir import OutputDir
from checkpoints_tools.ops import stream
from checkpoints_tools.ops.options import CommonOptions, manifest_extra
from checkpoints_tools.ops.parents import input_paths
from checkpoints_tools.ops.provenance import source_record
from checkpoints_tools.readers import open_checkpoint
from checkpoints_tools.safe_load import CheckpointError
from checkpoints_tools.workspace import Workspace
from jam_metaseq.models import keys
from jam_metaseq.models.config import CrossConfig, ModelConfig
from jam_metaseq.models.keys import TIED
from jam_metaseq.vocab import VocabManifest, find_vocab
from jam_metaseq.vocab_rows import ROW_INIT_RULES, extend_rows, rows_record


def with_vocab_size(cfg: ModelConfig, size: int) -> ModelConfig:
    """``cfg`` with ``size`` embedding rows (both branches of a JAM-Cross)."""
    if isinstance(cfg, CrossConfig):
        img = cfg.image_parent
        return dataclasses.replace(cfg, parent=dataclasses.replace(cfg.parent, vocab_size=size),
                                   image_parent=None if img is None else dataclasses.replace(img, vocab_size=size))
    return dataclasses.replace(cfg, vocab_size=size)


def extend_vocab(src: str | os.PathLike, *, opts: CommonOptions, new_vocab: VocabManifest | str | os.PathLike | None,
                 old_vocab: str | os.PathLike | None = None, rule: str = "text_mean",
                 heads: int | None = None) -> Path:
    """``src`` with the rows ``new_vocab`` adds (None: the checkpoint's own manifest with the
    conversation tokens). ``old_vocab``: the manifest the checkpoint was trained with, where it
    stores none (default: its own, stored in it or ``vocab.json`` beside it)."""
    if rule not in ROW_INIT_RULES:
        raise CheckpointError(f"unknown row init rule {rule!r}; expected one of {sorted(ROW_INIT_RULES)}")
    r = open_checkpoint(src, trust_pickle=opts.trust_pickle, replica_mismatch=opts.replica_mismatch)
    old = r.vocab(old_vocab)
    if old is None:
        raise CheckpointError(f"{r.path}: the checkpoint has no vocabulary manifest (stored in it or vocab.json "
                              "beside it); give the one it was trained with (--old-vocab)")
    new = old.with_conversation_tokens() if new_vocab is None else find_vocab(given=new_vocab)
    cfg = r.config(**({"heads": heads} if heads else {}))
    where = r.files[0] if r.files else r.path
    try:
        old.check_embedding(cfg.vocab_size, what="checkpoint")
        rows = rows_record(old, new, rule=rule)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if new == old:
        raise CheckpointError(f"{where}: its vocabulary already is the new one (nothing to add)")
    vocab_keys = [n for n in r.names() if keys.rule_for(n) == "vocab"]
    if not vocab_keys:
        raise CheckpointError(f"{where}: no vocabulary tensor (embedding, output projection) to extend")
    out_cfg = with_vocab_size(cfg, new.size)
    shapes = {n: ((new.size, *s[1:]) if n in vocab_keys else s) for n, s in r.shapes().items()}
    out = OutputDir(opts.spec, cfg=out_cfg, shapes=shapes, vocab=new.to_dict(), inputs=input_paths([r]))
    ws = Workspace()

    def produce(name: str, buf: torch.Tensor) -> torch.Tensor:
        info = r.info(name)
        if name not in vocab_keys:
            return r.get_into(name, buf)
        rows_in = r.get_into(name, ws.get("in", info.shape, info.dtype))
        return buf.copy_(extend_rows(rows_in, old=old, new=new, rule=rule))

    extra = manifest_extra(opts, "extend-vocab", [source_record("source", r, hash_sources=opts.hash_sources)],
                           init=rule, old_vocab=old.to_dict())
    extra["vocab_rows"] = rows
    return stream.stream_to(out, produce, produced_dtypes={n: r.info(n).dtype for n in shapes}, desc="extend-vocab",
                            progress=opts.progress, threads=opts.threads, manifest_extra=extra, tied=r.tied(*TIED))


__all__ = ["extend_vocab", "with_vocab_size"]

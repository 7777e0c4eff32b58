"""Inputs of the evaluation tools: a checkpoint as (model, config, vocabulary) and evaluation data
as token sequences (paper §3.2: the checkpoints evaluated in Tables 1-5).

Checkpoints
    are loaded by ``checkpoints_tools.load_model``, the project's one loader (every layout the
    tools read; the model config and vocabulary manifest in or beside the checkpoint unless
    ``--config`` / ``--vocab`` name them). ``save_checkpoint`` writes the single-file form.

Data
    ``read_sequences(path, ...)``: a JSONL file of documents (``jam_metaseq.data.documents``; images
    given as ``image_tokens``, or as files when an image tokenizer is passed) or the prefix of a
    binarized dataset (``jam-data binarize`` output: ``PREFIX.json`` exists). Every document is one
    sequence, ending with ``<eos>``; loss masks come along (all True except instruction prompts).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from jam_metaseq.errors import JamError
from jam_metaseq.models.config import CHECKPOINT_KEY as CONFIG_KEY
from jam_metaseq.vocab import CHECKPOINT_KEY as VOCAB_KEY
from jam_metaseq.vocab import VocabManifest


class EvalInputError(JamError, ValueError):
    """Bad evaluation input; the message names the file and what is wrong."""


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, vocab: VocabManifest) -> None:
    """A single-file checkpoint (``model``, ``jam_config``, ``jam_vocab``) ``load_model`` reads, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), CONFIG_KEY: model.cfg.to_dict(), VOCAB_KEY: vocab.to_dict()}, tmp)
    os.replace(tmp, path)


def is_binarized(path: str | os.PathLike) -> bool:
    """A binarized dataset's prefix (``PREFIX.json`` exists), not a JSONL file."""
    return Path(f"{path}.json").is_file() and not str(path).endswith(".jsonl")


def read_sequences(
    path: str | os.PathLike,
    *,
    vocab: VocabManifest,
    text_tokenizer: Any = None,
    image_tokenizer: Any = None,
    limit: int | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Documents of a JSONL file or binarized dataset: (token arrays, loss-mask arrays)."""
    p = Path(path)
    seqs: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    if is_binarized(p):
        from jam_metaseq.data.binarize import open_dataset

        try:
            ds = open_dataset(p, vocab=vocab)
        except (ValueError, FileNotFoundError) as e:
            raise EvalInputError(str(e)) from None
        n = ds.num_documents if limit is None else min(limit, ds.num_documents)
        for j in range(n):
            d = ds.document(j)
            seqs.append(d["tokens"])
            masks.append(d["loss_mask"])
        return seqs, masks
    if not p.is_file():
        raise EvalInputError(f"{p}: no such JSONL file or binarized dataset (no {p}.json)")
    if text_tokenizer is None:
        raise EvalInputError(f"{p}: a JSONL file needs a text tokenizer (--tokenizer, or text_tokenizer "
                             "in the vocabulary manifest)")
    from jam_metaseq.data.documents import DocumentError, iter_jsonl

    try:
        for rec in iter_jsonl(p, vocab=vocab, text_tokenizer=text_tokenizer, image_tokenizer=image_tokenizer,
                              response_loss_only=True):
            seqs.append(rec.tokens)
            masks.append(rec.loss_mask)
            if limit is not None and len(seqs) >= limit:
                break
    except DocumentError as e:
        raise EvalInputError(str(e)) from None
    return seqs, masks

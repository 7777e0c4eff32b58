"""A parent read with the vocabulary rows its manifest adds (issue 23: "or adds rows").

An imported parent's manifest may use more ids than the parent's embedding has rows: Gemma-7B
(256,000 rows) beside Liquid-7B, whose vocabulary is Gemma's plus 8,192 image codes. The manifest
names those rows (``TokenIds.extends``: [rows of the smaller embedding, size)) and the rule that
starts them (``jam_metaseq.vocab_rows.ROW_INIT_RULES``, ``text_mean`` by default); ``extend_rows``
wraps such a parent so that every reader of it (merge, widen, cross, reshard, convert) sees the
wider embedding and output projection: the parent's own rows unchanged, then the added rows, each
the rule's value. Nothing is written back: the added rows exist in the output only, and the
output's manifest records them (``ops.provenance``'s source record: ``vocab_rows``).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any

import torch

from checkpoints_tools.readers.base import Reader, TensorInfo
from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.models import keys
from jam_metaseq.models.config import CrossConfig, ModelConfig
from jam_metaseq.vocab import VocabManifest
from jam_metaseq.vocab_rows import ROW_INIT_RULES


class ExtendedRows(Reader):
    """``inner`` with every vocabulary-rule tensor (embedding, output projection) grown to
    ``vocab.size`` rows by ``vocab``'s ``extends`` rule."""

    def __init__(self, inner: Reader, vocab: VocabManifest) -> None:
        x = vocab.explicit_ids
        self.inner, self.manifest = inner, vocab
        self.start, self.size, self.rule = x.extends[0], x.size, x.extend_init
        self.path, self.format, self.mp, self.fsdp = inner.path, inner.format, inner.mp, inner.fsdp
        self.files, self.meta = inner.files, inner.meta
        infos: OrderedDict[str, TensorInfo] = OrderedDict()
        for n, info in inner._infos.items():
            grow = keys.rule_for(n) == "vocab" and info.shape[0] == self.start
            infos[n] = TensorInfo((self.size, *info.shape[1:]), info.dtype) if grow else info
        self._infos = infos

    def record(self) -> dict[str, Any]:
        """What the output's manifest says about the rows added to this parent."""
        return {"rows": [self.start, self.size], "init": self.rule,
                "tensors": [n for n in self._infos if self._infos[n].shape != self.inner.info(n).shape]}

    def config(self, **overrides: Any) -> ModelConfig:
        cfg = self.inner.config(**overrides)
        if isinstance(cfg, CrossConfig):
            raise CheckpointError(f"{self.path}: a JAM-Cross model's vocabulary is not extended here; extend its "
                                  "parents' (their manifest's ids.extends)")
        return dataclasses.replace(cfg, vocab_size=self.size) if cfg.vocab_size == self.start else cfg

    def tied(self, a: str, b: str) -> bool:
        return self.inner.tied(a, b)

    def prefetch(self, name: str) -> None:
        self.inner.prefetch(name)

    def vocab(self, given: Any = None) -> VocabManifest | None:
        return self.manifest if given is None else super().vocab(given)

    def get_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        self._start_read(name, out)
        inner = self.inner.info(name)
        if inner.shape == tuple(out.shape):
            return self.inner.get_into(name, out)
        own = self.inner.get(name)  # (start, E) as stored
        out[: self.start].copy_(own)
        out[self.start:].copy_(ROW_INIT_RULES[self.rule](own, self.manifest))  # (E,) broadcast over the new rows
        return out


def extend_rows(reader: Reader, vocab: VocabManifest | None) -> Reader:
    """``reader`` as ``vocab`` sees it: with the rows its ``extends`` adds when the reader's
    embedding has exactly the rows before them; unchanged when it already has ``vocab.size`` rows
    (or the manifest adds none); any other row count is refused naming both."""
    x = None if vocab is None else vocab.explicit_ids
    if x is None or x.extends is None:
        return reader
    emb = next((k for k in (keys.EMBED, keys.BRANCH_EMBED["llm"]) if k in reader), None)
    rows = None if emb is None else reader.info(emb).shape[0]
    if rows is None or rows == x.size:
        return reader
    if rows != x.extends[0]:
        raise CheckpointError(f"{reader.path}: its embedding has {rows} rows; the vocabulary manifest has {x.size} "
                              f"ids and adds rows [{x.extends[0]}, {x.size}) to an embedding of {x.extends[0]}")
    return ExtendedRows(reader, vocab)

"""An HF directory written as it streams (``jam-ckpt convert --to hf``): the model's family layout
(``jam_metaseq.models.hf_families``), ``config.json``, and safetensors shards cut at a size limit
with ``model.safetensors.index.json`` as ``save_pretrained`` writes them, so ``transformers``
(``AutoModelForCausalLM.from_pretrained``) and any HF-compatible server load it with no custom code.

The shard plan is fixed up front from the shapes (each file's header names its tensors), then every
tensor of ours goes, as its HF tensors, into the next place of its shard: nothing is held back, so
memory stays at one tensor whatever the model size.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from checkpoints_tools.io.errors import OutputError
from checkpoints_tools.io.safetensors import SafetensorsStreamWriter
from jam_metaseq.models.config import DecoderConfig, ModelConfig
from jam_metaseq.models.hf_families import FAMILIES, HFFamily, family_for

FORMATS = ("hf", *(f"hf_{t}" for t in FAMILIES))
"""``OutputSpec.format`` values written here: ``hf`` (the family whose class computes the model) or
``hf_{model_type}`` (that family, refused by name if its class does not compute the model)."""
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
"""Bytes per safetensors shard at most (``save_pretrained``'s ``max_shard_size="5GB"``); a single
tensor larger than that gets a shard of its own."""
INDEX = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"2GiB"`` / ``"123"`` (bytes) -> bytes (HF's decimal units, and binary)."""
    m = _SIZE.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"size {text!r}: expected a positive number of bytes, e.g. 5GB, 500MB, 2GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def family_of_output(fmt: str, cfg: ModelConfig) -> HFFamily:
    """The family an HF output format writes for the model ``cfg`` (errors name the field)."""
    fam = family_for(cfg)
    if fmt != "hf" and fmt != f"hf_{fam.model_type}":
        raise ValueError(f"--format {fmt}: this model is a {fam.model_type} model (its class is {fam.architecture})")
    return fam


def plan_shards(plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]], *, max_shard_size: int
                ) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """Tensors in write order, cut into shards of at most ``max_shard_size`` bytes each (greedy, in
    order; a tensor larger than the limit alone)."""
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for name, shape, dt in plan:
        n = dt.itemsize
        for s in shape:
            n *= s
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, dt))
        size += n
    return shards


class HFDirWriter:
    """One model's HF files in a (temp) directory: ``add`` each tensor of ours in order, then ``finish``."""

    def __init__(self, tmp: Path, *, family: HFFamily, cfg: DecoderConfig, shapes: Mapping[str, Sequence[int]],
                 dtype: torch.dtype, max_shard_size: int, shown: Any, vocab: Mapping[str, Any] | None = None) -> None:
        self.family, self.cfg = family, cfg
        self.config = family.hf_config(cfg, dtype=dtype)
        if vocab and family.vocab_to_hf is not None:  # what transformers reads of the vocabulary (Chameleon's)
            from jam_metaseq.vocab import VocabManifest

            self.config.update(family.vocab_to_hf(VocabManifest.from_dict(dict(vocab), source="vocab.json")))
        plan = [(n, s, dtype) for n, s in family.hf_shapes(shapes, cfg=cfg).items()]
        shards = plan_shards(plan, max_shard_size=max_shard_size)
        k = len(shards)
        self.names = ["model.safetensors"] if k == 1 else [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
        self.where = {n: i for i, shard in enumerate(shards) for n, _, _ in shard}
        self.total_size = sum(dt.itemsize * _numel(s) for _, s, dt in plan)
        self._tmp = tmp
        self._writers = [SafetensorsStreamWriter(tmp / f, shard, {"format": "pt"}, shown=shown(f))
                         for f, shard in zip(self.names, shards)]

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Tensor ``name`` of ours, as its HF tensors, into their shards."""
        for hn, ht in self.family.to_hf_items(name, tensor, cfg=self.cfg):
            self._writers[self.where[hn]].add(hn, ht)

    def finish(self) -> dict[str, tuple[str, int]]:
        """Close the shards; {file name: (sha256, bytes)} of each (the index and config.json are
        the caller's small files: ``small_files``)."""
        return {w.path.name: w.finish() for w in self._writers}

    def small_files(self) -> dict[str, bytes]:
        """``config.json`` and, for more than one shard, the index, as bytes."""
        out = {"config.json": (json.dumps(self.config, indent=2) + "\n").encode()}
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {n: self.names[i] for n, i in self.where.items()}}
            out[INDEX] = (json.dumps(index, indent=2) + "\n").encode()
        return out

    def abort(self) -> None:
        for w in self._writers:
            w.abort()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def check_hf_layout(fmt: str, cfg: ModelConfig, *, mp: int, fsdp: int) -> HFFamily:
    """The family an HF output of ``cfg`` is written as, once the layout is checked (consolidated)."""
    if mp != 1 or fsdp:
        raise OutputError(f"{fmt} output is consolidated: use --mp 1 without --fsdp")
    try:
        return family_of_output(fmt, cfg)
    except ValueError as e:
        raise OutputError(str(e)) from None

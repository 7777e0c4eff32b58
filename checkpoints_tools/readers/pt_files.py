"""Which ``.pt`` files make one metaseq/fairseq checkpoint (``docs/CHECKPOINTS.md``, Files):
``X.pt``, ``X-model_part-{r}.pt``, ``X-shard{j}.pt``, ``X-model_part-{r}-shard{j}.pt``, grouped by
rank and shard and checked for gaps; and what is kept of one rank once its files are loaded
(``RankSource``: the mapped model dicts and, for FSDP shards, where each parameter lives).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from checkpoints_tools.safe_load import CheckpointError, MappedFile

# fairscale/FSDP and activation-checkpoint wrappers leave these in parameter names.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_fpw_module.", "_checkpoint_wrapped_module.")
PART_RE = re.compile(r"^(?P<base>.*?)(?:-model_part-(?P<part>\d+))?(?:-shard(?P<shard>\d+))?\.pt$")


def strip_wrappers(name: str) -> str:
    """``name`` without the wrapper prefixes FSDP and activation checkpointing leave in it."""
    for p in WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


@dataclass
class FlatSlot:
    """Where one original parameter lives inside an FSDP flat parameter of one rank."""

    flat_key: str
    offset: int
    numel: int
    shape: tuple[int, ...]


@dataclass
class RankSource:
    """One model-parallel rank: its shard files' model dicts (mmap) and the FSDP index."""

    files: list[Path]
    models: list[Mapping[str, torch.Tensor]]
    mapped: list[MappedFile] = field(default_factory=list)
    pads: list[dict[str, int]] = field(default_factory=list)  # per shard: flat_key -> padding
    slots: dict[str, FlatSlot] = field(default_factory=dict)  # param name -> where
    plain: dict[str, str] = field(default_factory=dict)  # name -> key in models[0] (unflattened)
    flat_only_rank0: set[str] = field(default_factory=set)


def group_pt(files: Sequence[Path]) -> dict[str, dict[int, dict[int, Path]]]:
    """base -> part -> shard -> file (missing part/shard numbers = -1 for "none")."""
    out: dict[str, dict[int, dict[int, Path]]] = {}
    for f in files:
        m = PART_RE.match(f.name)
        if not m:
            continue
        part = int(m["part"]) if m["part"] is not None else -1
        shard = int(m["shard"]) if m["shard"] is not None else -1
        out.setdefault(m["base"], {}).setdefault(part, {})[shard] = f
    return out


def validate_groups(base: Path, groups: dict[int, dict[int, Path]]) -> tuple[dict[int, dict[int, Path]], bool]:
    """One checkpoint's files (``group_pt``'s part -> shard -> file) checked for missing or mixed
    parts and shards, renumbered from 0; and whether they are FSDP shards."""
    parts = sorted(groups)
    if -1 in parts and len(parts) > 1:
        raise CheckpointError(f"{base}: both a file without -model_part and model_part files exist; "
                              "move one set away")
    if parts != [-1] and parts != list(range(len(parts))):
        missing = sorted(set(range(max(parts) + 1)) - set(parts))
        raise CheckpointError(f"{base}: missing model part(s) {missing} (found {parts})")
    shard_sets = {tuple(sorted(s)) for s in groups.values()}
    if len(shard_sets) > 1:
        raise CheckpointError(f"{base}: model parts have different FSDP shard files: {sorted(shard_sets)}")
    shards = list(shard_sets.pop())
    fsdp = shards != [-1]
    if fsdp and (-1 in shards or shards != list(range(len(shards)))):
        missing = sorted(set(range(max(shards) + 1)) - set(shards))
        raise CheckpointError(f"{base}: missing FSDP shard(s) {missing} (found {shards})")
    renum = {(0 if p == -1 else p): {(0 if s == -1 else s): f for s, f in sh.items()}
             for p, sh in groups.items()}
    return renum, fsdp


def glob_escape(s: str) -> str:
    """``s`` as a literal in a glob pattern."""
    return re.sub(r"([*?\[])", r"[\1]", s)

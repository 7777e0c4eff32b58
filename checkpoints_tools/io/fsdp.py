"""FSDP shard files as fairscale writes them: the tensors of each unit (one per decoder layer or
cross block, the rest in the root) flattened into one ``flat_param_0``, chunked over the shards,
padded to chunk 0's size, described by ``shard_metadata`` (names, shapes, numels, padding, the
tied output projection as ``shared_param_info``).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import torch

from checkpoints_tools.io.errors import OutputError
from checkpoints_tools.io.torch_zip import TorchStreamWriter
from jam_metaseq.models import keys


def fsdp_unit(name: str) -> tuple[str, str]:
    """(fsdp_path, name inside the unit): one unit per layer / cross block (a block of the key
    schema, ``jam_metaseq.models.keys``), the rest in the root."""
    block = keys.block_of(name)
    if block is None:
        return "", name
    return name[: -len(block[2]) - 1], block[2]


@dataclass
class Unit:
    path: str
    names: list[str]  # local names, in order
    pending: dict[str, torch.Tensor] = field(default_factory=dict)


class FsdpRank:
    """FSDP shard files of one MP rank: collects each unit's tensors, then flattens and chunks it."""

    def __init__(self, files: list[TorchStreamWriter], units: dict[str, Unit], shared: list[tuple[str, str]],
                 buffers: list[str]) -> None:
        self.files = files
        self.units = units
        self.shared = shared
        self.buffers = buffers
        self.models: list[dict[str, Any]] = [collections.OrderedDict() for _ in files]
        self.metas: list[dict[str, dict[str, Any]]] = [{} for _ in files]  # unit path -> entry

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.buffers:
            for j, w in enumerate(self.files):
                self.models[j][name] = w.add(t)
            return
        path, local = fsdp_unit(name)
        unit = self.units[path]
        unit.pending[local] = t
        if len(unit.pending) == len(unit.names):
            self._flush(unit)

    def _flush(self, unit: Unit) -> None:
        W = len(self.files)
        tensors = [unit.pending[n] for n in unit.names]
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) > 1:
            raise OutputError(f"FSDP unit {unit.path or '<root>'}: mixed dtypes {dtypes}")
        flat = torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.empty(0)
        unit.pending.clear()
        # fairscale: chunk(W), pad every chunk to chunk 0's size with zeros.
        chunks = list(torch.flatten(flat).chunk(W))
        while len(chunks) < W:
            chunks.append(flat.new_empty(0))
        size0 = chunks[0].numel()
        flat_key = f"{unit.path}.flat_param_0" if unit.path else "flat_param_0"
        for j, w in enumerate(self.files):
            c = chunks[j]
            pad = size0 - c.numel()
            if pad:
                c = torch.cat([c, c.new_zeros(pad)])
            self.models[j][flat_key] = w.add(c)
            self.metas[j][unit.path] = {
                "fsdp_path": unit.path,
                "params": {"flat_param_0": {
                    "names": list(unit.names), "shapes": [tuple(t.shape) for t in tensors],
                    "numels": [t.numel() for t in tensors], "padding": pad}},
                "no_broadcast_optim_state": False,
                "shared_param_info": list(self.shared) if unit.path == "" else [],
            }
        del flat, chunks

    def shard_metadata(self, j: int) -> dict[str, Any]:
        order = sorted(self.metas[j], key=lambda p: (p != "", 0))  # root first, then as flushed
        return {"param_metadata": [self.metas[j][p] for p in order], "buffer_names": list(self.buffers)}

"""FSDP shards (fairscale's ``local_metadata_dict()``, saved as ``shard_metadata`` by metaseq and as
``fsdp_metadata`` by fairseq): each unit's parameters flattened into one flat
parameter, chunked over the shard files, padded. ``index_shards`` says where each original
parameter lies; ``flat_pieces`` walks the shards' unpadded chunks, so a parameter is read
straight from its bytes and the whole flat vector is never built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from checkpoints_tools.readers.pt_files import FlatSlot, RankSource, strip_wrappers
from checkpoints_tools.safe_load import CheckpointError

FSDP_METADATA_KEYS = ("shard_metadata", "fsdp_metadata")
"""Where an FSDP shard file keeps fairscale's ``local_metadata_dict()`` (flat parameters per unit,
padding, shared parameters, buffers): metaseq's trainer saves it as ``shard_metadata``, fairseq's
as ``fsdp_metadata``; the contents are the same."""


def fsdp_metadata(obj: Mapping[str, Any]) -> Any:
    """The FSDP metadata of one loaded shard file, under either host's key (None if absent)."""
    return next((obj[k] for k in FSDP_METADATA_KEYS if obj.get(k) is not None), None)


def index_shards(src: RankSource, metas: list[Any]) -> None:
    """Fill ``src`` (one rank's loaded shard files) from their ``shard_metadata``: where each
    parameter lies in which flat parameter (``src.slots``; a tied one points at its source's
    slot), each shard's padding (``src.pads``), the buffers (``src.plain``). Shards that are
    missing, extra or disagree with the metadata are errors naming the file."""
    for f, m in zip(src.files, metas):
        if not m or "param_metadata" not in m:
            raise CheckpointError(f"{f}: FSDP shard without 'shard_metadata' (metaseq) or 'fsdp_metadata' (fairseq)")
    meta0 = metas[0]
    for f, m in zip(src.files, metas):
        if len(m["param_metadata"]) != len(meta0["param_metadata"]):
            raise CheckpointError(f"{f}: shard_metadata differs from {src.files[0].name}")
    src.pads = [{} for _ in src.files]
    shared: list[tuple[str, str]] = []
    for unit_idx, unit in enumerate(meta0["param_metadata"]):
        fsdp_path = unit.get("fsdp_path", "")
        for flat_name, v in unit["params"].items():
            flat_key = f"{fsdp_path}.{flat_name}" if fsdp_path else flat_name
            key = find_key(src.models[0], flat_key, src.files[0])
            for j, m in enumerate(metas):
                src.pads[j][key] = int(m["param_metadata"][unit_idx]["params"][flat_name]["padding"])
            names, shapes, numels = v["names"], v["shapes"], v["numels"]
            total = sum(int(n) for n in numels)
            only0 = bool(unit.get("no_broadcast_optim_state", False))
            have = 0
            for j, model in enumerate(src.models):
                if key not in model:
                    raise CheckpointError(f"{src.files[j]}: missing flat parameter {key!r}")
                have += model[key].numel() - src.pads[j][key]
                if only0:
                    break
            if have != total:
                raise CheckpointError(
                    f"{src.files[0].parent}: flat parameter {key!r} has {have} elements over "
                    f"{len(src.models)} shard(s) but shard_metadata says {total}: missing or extra shards?"
                )
            off = 0
            for n, s, k in zip(names, shapes, numels):
                full = strip_wrappers(f"{fsdp_path}.{n}" if fsdp_path else n)
                src.slots[full] = FlatSlot(flat_key=key, offset=off, numel=int(k),
                                           shape=tuple(int(x) for x in s))
                off += int(k)
            if only0:
                src.flat_only_rank0.add(key)
        shared += [tuple(x) for x in unit.get("shared_param_info", [])]
    for src_name, dst_name in shared:
        a, b = strip_wrappers(src_name), strip_wrappers(dst_name)
        if a in src.slots:
            src.slots[b] = src.slots[a]
    for b in meta0.get("buffer_names", []):
        key = find_key(src.models[0], b, src.files[0])
        src.plain[strip_wrappers(b)] = key
    index_tied_aliases(src)


def index_tied_aliases(src: RankSource) -> None:
    """Unflattened units (``flatten_parameters=False``, fairseq's ``--not-fsdp-flatten-parameters``)
    describe a parameter tied to another (the output projection) once and list no
    ``shared_param_info``, while the state dict holds it under both names as one stored tensor:
    such a key reads as the parameter it shares storage with. Any other key the metadata does
    not describe is an error, not a tensor silently left out."""
    def where(t: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
        return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)

    model = src.models[0]
    described = {s.flat_key for s in src.slots.values()} | set(src.plain.values())
    names_per_key: dict[str, list[str]] = {}
    for name, slot in src.slots.items():
        names_per_key.setdefault(slot.flat_key, []).append(name)
    whole = {where(model[k]): names[0] for k, names in names_per_key.items() if len(names) == 1}
    for key, t in model.items():
        alias = whole.get(where(t)) if key not in described and isinstance(t, torch.Tensor) else None
        if alias is not None:
            src.slots[strip_wrappers(key)] = src.slots[alias]
            described.add(key)
    for f, m in zip(src.files, src.models):
        unknown = [k for k, t in m.items() if k not in described and isinstance(t, torch.Tensor)]
        if unknown:
            raise CheckpointError(f"{f}: tensor {unknown[0]!r} is in the state dict but not in its "
                                  "FSDP shard metadata")


def find_key(model: Mapping[str, Any], key: str, f: Path) -> str:
    """The key of ``model`` that ``shard_metadata`` calls ``key`` (wrapper prefixes aside)."""
    if key in model:
        return key
    stripped = {strip_wrappers(k): k for k in model}
    if strip_wrappers(key) in stripped:
        return stripped[strip_wrappers(key)]
    raise CheckpointError(f"{f}: shard_metadata names {key!r} but the state dict has no such key")


def flat_pieces(src: RankSource, slot: FlatSlot) -> list[tuple[int, torch.Tensor, slice]]:
    """(shard index, mapped view, where it goes in the flattened parameter) of the parameter at
    ``slot``: the part of each shard's unpadded chunk that overlaps [offset, offset + numel)."""
    out: list[tuple[int, torch.Tensor, slice]] = []
    # Walk the shards' unpadded chunks; take the part of each that overlaps [offset, offset+numel).
    pos, lo, hi = 0, slot.offset, slot.offset + slot.numel
    for j, model in enumerate(src.models):
        flat = model[slot.flat_key]
        n = flat.numel() - src.pads[j][slot.flat_key]
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append((j, flat[a - pos:b - pos], slice(a - lo, b - lo)))
        pos += n
        if pos >= hi or slot.flat_key in src.flat_only_rank0:
            break
    return out

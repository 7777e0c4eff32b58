"""metaseq / fairseq ``.pt`` checkpoints: one consolidated file, or model-parallel parts (joined
by ``layout`` as they are read, each piece straight into its place), each part plain or as FSDP
shards (``readers/fsdp.py``). Pickles are read by ``safe_load`` only; the model-parallel copies of
a replicated tensor must agree (``REPLICA_MISMATCH``).
"""

from __future__ import annotations

import warnings
from argparse import Namespace
from collections import OrderedDict
from pathlib import Path

import torch

from checkpoints_tools import layout
from checkpoints_tools.readers.base import (
    REPLICA_MISMATCH, Reader, ReplicaMismatchWarning, TensorInfo, check_parameter_dtype,
)
from checkpoints_tools.readers.fsdp import FSDP_METADATA_KEYS, flat_pieces, fsdp_metadata, index_shards
from checkpoints_tools.readers.pt_files import (
    PART_RE, RankSource, glob_escape, group_pt, strip_wrappers, validate_groups,
)
from checkpoints_tools.safe_load import CheckpointError, MappedFile, safe_torch_load
from checkpoints_tools.workspace import Workspace


class MetaseqReader(Reader):
    """metaseq/fairseq ``.pt`` files: consolidated, MP parts, FSDP shards or both."""

    def __init__(self, groups: dict[int, dict[int, Path]], *, path: Path, trust_pickle: bool,
                 fsdp: bool, replica_mismatch: str = "error") -> None:
        if replica_mismatch not in REPLICA_MISMATCH:
            raise ValueError(f"replica_mismatch must be one of {REPLICA_MISMATCH}, got {replica_mismatch!r}")
        self.path = path
        self.replica_mismatch = replica_mismatch
        self._replicas_checked: set[str] = set()
        self.format = "metaseq"
        self.mp = len(groups)
        self.fsdp = len(next(iter(groups.values()))) if fsdp else 0
        self.files = [f for r in sorted(groups) for _, f in sorted(groups[r].items())]
        self.meta = {}
        self._ws = Workspace()  # scratch for pieces that cannot be read straight into place
        self._ranks: list[RankSource] = []
        for r in sorted(groups):
            shards = groups[r]
            files = [shards[j] for j in sorted(shards)]
            loaded = [safe_torch_load(f, trust_pickle=trust_pickle) for f in files]
            for i, (f, obj) in enumerate(zip(files, loaded)):
                if isinstance(obj, dict) and "model" not in obj and obj and \
                        all(isinstance(v, torch.Tensor) for v in obj.values()):
                    loaded[i] = obj = {"model": obj}  # a bare state dict (HF pytorch_model.bin)
                if not isinstance(obj, dict) or "model" not in obj:
                    raise CheckpointError(f"{f}: no 'model' state dict in this checkpoint")
            if not self.meta:
                self.meta = {k: v for k, v in loaded[0].items()
                             if k not in ("model", "last_optimizer_state", *FSDP_METADATA_KEYS)}
            src = RankSource(files=files, models=[o["model"] for o in loaded],
                              mapped=[MappedFile(f) for f in files])
            if fsdp:
                index_shards(src, [fsdp_metadata(o) for o in loaded])
            else:
                src.plain = {strip_wrappers(k): k for k in src.models[0]}
            self._ranks.append(src)
            del loaded
        self._check_expected_counts()
        self._infos = self._build_infos()

    def _check_expected_counts(self) -> None:
        cfg = self.meta.get("cfg") or {}
        common = cfg.get("common", {}) if isinstance(cfg, dict) else {}
        want = common.get("model_parallel_size") if isinstance(common, dict) else None
        if want is None and isinstance(cfg, dict) and isinstance(cfg.get("model"), Namespace):
            want = getattr(cfg["model"], "model_parallel_size", None)
        if want is not None and int(want) != self.mp:
            raise CheckpointError(
                f"{self.files[0]}: cfg says model_parallel_size={want} but {self.mp} part(s) were found "
                "(missing or extra model_part files?)"
            )

    # -- shapes ------------------------------------------------------------------------------
    def _rank_entries(self, src: RankSource) -> "OrderedDict[str, tuple[tuple[int, ...], torch.dtype]]":
        out: OrderedDict[str, tuple[tuple[int, ...], torch.dtype]] = OrderedDict()
        for n, k in src.plain.items():
            t = src.models[0][k]
            if isinstance(t, torch.Tensor):
                out[n] = (tuple(t.shape), t.dtype)
        for n, s in src.slots.items():
            out[n] = (s.shape, src.models[0][s.flat_key].dtype)
        return out

    def _build_infos(self) -> "OrderedDict[str, TensorInfo]":
        per_rank = [self._rank_entries(s) for s in self._ranks]
        names0 = list(per_rank[0])
        for r, entries in enumerate(per_rank[1:], start=1):
            if set(entries) != set(names0):
                extra = sorted(set(entries) ^ set(names0))[:3]
                raise CheckpointError(
                    f"{self._ranks[r].files[0]}: tensors differ from {self._ranks[0].files[0].name}: {extra}"
                )
        infos: OrderedDict[str, TensorInfo] = OrderedDict()
        for n in names0:
            shapes = [pr[n][0] for pr in per_rank]
            dtypes = {pr[n][1] for pr in per_rank}
            if len(dtypes) > 1:
                raise CheckpointError(f"{self.path}: tensor {n} has mixed dtypes across parts: {dtypes}")
            for r, sh in enumerate(shapes):
                if sh != shapes[0]:
                    raise CheckpointError(
                        f"{self._ranks[r].files[0]}: tensor {n} has shape {sh}, part 0 has {shapes[0]}")
            dtype = dtypes.pop()
            check_parameter_dtype(self._ranks[0].files[0], n, dtype)
            infos[n] = TensorInfo(layout.full_shape(n, shapes[0], self.mp), dtype)
        return infos

    # -- reading -----------------------------------------------------------------------------
    def _rank_view_pieces(self, src: RankSource, name: str) -> list[tuple[int, torch.Tensor, slice]]:
        """(shard index, mapped view, where it goes in the rank's flat tensor) of one rank's tensor."""
        if name in src.plain:
            return [(0, src.models[0][src.plain[name]], slice(None))]
        return flat_pieces(src, src.slots[name])

    def _rank_tensor(self, src: RankSource, name: str, dtype: torch.dtype | None,
                     dest: torch.Tensor | None = None) -> torch.Tensor:
        """One rank's piece of ``name``, read once from the files (into ``dest`` if given)."""
        pieces = self._rank_view_pieces(src, name)
        if name in src.plain:
            j, view, _ = pieces[0]
            return src.mapped[j].read(view, dest=dest, dtype=dtype, scratch=self._ws)
        slot = src.slots[name]
        out = dest if dest is not None else torch.empty(slot.shape, dtype=dtype or pieces[0][1].dtype)
        flat = out.view(-1) if out.is_contiguous() else None
        if flat is None:  # a strided destination: assemble contiguously first
            tmp = self._ws.get("fsdp", slot.shape, pieces[0][1].dtype)
            return out.copy_(self._rank_tensor(src, name, None, dest=tmp))
        for j, view, where in pieces:
            src.mapped[j].read(view, dest=flat[where], scratch=self._ws)
        return out

    def get_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        info = self._start_read(name, out)
        if self.mp == 1:
            return self._rank_tensor(self._ranks[0], name, None, dest=out)
        if layout.rule_for(name) == "replicated":
            return self._replicated_into(name, info, out)
        piece_shape = layout.part_shape(name, info.shape, self.mp)
        for r, src in enumerate(self._ranks):
            dests = layout.destinations(name, out, piece_shape, r, self.mp)
            if len(dests) == 1:  # rows / columns / vocab: read straight into place
                self._rank_tensor(src, name, None, dest=dests[0][0])
            else:  # qkv: three blocks of one piece
                piece = self._rank_tensor(src, name, None, dest=self._ws.get("qkv", piece_shape, info.dtype))
                for dest, rows in dests:
                    dest.copy_(piece[rows])
        return out

    def _replicated_into(self, name: str, info: TensorInfo, out: torch.Tensor) -> torch.Tensor:
        """A replicated tensor: part 0's copy, once every other part's copy is checked to be
        bitwise the same (``replica_mismatch`` says what a difference does)."""
        direct = out.dtype == info.dtype and out.is_contiguous()
        base = self._rank_tensor(self._ranks[0], name, None,
                                 dest=out if direct else self._ws.get("replica0", info.shape, info.dtype))
        base_bytes = base.reshape(-1).view(torch.uint8)
        for r in range(1, self.mp):
            other = self._rank_tensor(self._ranks[r], name, None,
                                      dest=self._ws.get("replica", info.shape, info.dtype))
            if torch.equal(other.reshape(-1).view(torch.uint8), base_bytes):
                continue
            diff = (other.double() - base.double()).abs().nan_to_num(float("inf")).max().item()
            what = (f"{self._ranks[r].files[0]}: replicated tensor {name} differs from part 0's copy "
                    f"({self._ranks[0].files[0].name}): max |difference| {diff:.6g}")
            if self.replica_mismatch == "error":
                raise CheckpointError(f"{what}; model-parallel parts must hold identical copies "
                                      "(--allow-replica-mismatch uses part 0's and warns)")
            if name not in self._replicas_checked:
                warnings.warn(f"{what}; using part 0's", ReplicaMismatchWarning, stacklevel=2)
            self._replicas_checked.add(name)
            break
        return out if direct else out.copy_(base)

    def tied(self, a: str, b: str) -> bool:
        if a not in self._infos or b not in self._infos:
            return False
        for src in self._ranks:
            if a in src.slots or b in src.slots:  # FSDP: shared_param_info points both at one slot
                if src.slots.get(a) is not src.slots.get(b):
                    return False
                continue
            ka, kb = src.plain.get(a), src.plain.get(b)
            if ka is None or kb is None:
                return False
            ta, tb = src.models[0][ka], src.models[0][kb]
            if not (ta.untyped_storage().data_ptr() == tb.untyped_storage().data_ptr()
                    and ta.storage_offset() == tb.storage_offset() and ta.shape == tb.shape
                    and ta.stride() == tb.stride()):
                return False
        return True

    def prefetch(self, name: str) -> None:
        if name not in self._infos:
            return
        for src in self._ranks:
            for j, view, _ in self._rank_view_pieces(src, name):
                if view.is_contiguous() and view.numel():
                    off = src.mapped[j]._locate(view.data_ptr())
                    if off is not None:
                        self._willneed(src.files[j], off, view.numel() * view.element_size())

    def get_rank_piece(self, name: str, rank: int) -> torch.Tensor:
        """Model-parallel rank ``rank``'s piece of ``name``, as stored."""
        return self._rank_tensor(self._ranks[rank], name, None)



def claims(path: Path) -> bool:
    """A directory holding ``.pt`` files, or any file path (``.pt``, ``.bin``: metaseq's
    ``--restore-file X.pt`` names the parts ``X-model_part-*.pt`` even where ``X.pt`` is absent)."""
    return any(path.glob("*.pt")) if path.is_dir() else True


def open_pt(path: Path, *, trust_pickle: bool = False, replica_mismatch: str = "error") -> MetaseqReader:
    """The ``.pt`` checkpoint at ``path``: a directory's one checkpoint, a file, or the parts and
    shards a ``--restore-file`` style ``X.pt`` names."""
    mkw = {"trust_pickle": trust_pickle, "replica_mismatch": replica_mismatch}
    if path.is_dir():
        grouped = group_pt(sorted(path.glob("*.pt")))
        if len(grouped) > 1:
            raise CheckpointError(f"{path}: several checkpoints ({', '.join(sorted(grouped))}); name one file")
        base = next(iter(grouped))
        groups, fsdp = validate_groups(path / base, grouped[base])
        return MetaseqReader(groups, path=path, fsdp=fsdp, **mkw)
    # .pt / .bin: the file itself, or metaseq's restore-file convention X.pt -> X-model_part-*.pt
    m = PART_RE.match(path.name if path.suffix == ".pt" else path.stem + ".pt")
    if path.suffix != ".pt" and path.is_file():
        return MetaseqReader({0: {0: path}}, path=path, fsdp=False, **mkw)
    if not m:
        raise CheckpointError(f"{path}: not a .pt/.safetensors checkpoint path")
    base = m["base"]
    siblings = [f for f in path.parent.glob(f"{glob_escape(base)}*.pt") if PART_RE.match(f.name)
                and PART_RE.match(f.name)["base"] == base]
    if path.is_file() and m["part"] is None and m["shard"] is None:
        siblings = [path]
    if not siblings:
        raise CheckpointError(f"{path}: no such file (and no {base}-model_part-*/-shard* files)")
    groups, fsdp = validate_groups(path.parent / base, group_pt(siblings)[base])
    return MetaseqReader(groups, path=path, fsdp=fsdp, **mkw)

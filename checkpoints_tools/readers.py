"""Lazy checkpoint readers: every supported layout seen as one consolidated (MP=1) state dict.

Layouts (``reference/metaseq.md``, Checkpoints): a consolidated ``X.pt``; model-parallel parts
``X-model_part-{r}.pt``; FSDP shards ``X-shard{j}.pt`` with ``shard_metadata``; both
(``X-model_part-{r}-shard{j}.pt``); safetensors files (single or indexed); HF OPT directories
(converted on the fly by ``convert_hf``). ``open_checkpoint(path)`` picks the layout and returns
a ``Reader`` whose ``get(name)`` materialises one consolidated tensor at a time: MP pieces are
joined with ``layout.join``, FSDP flat parameters are unpadded and cut by offset without ever
building the whole flat vector; bytes are read with pread (``safe_load.MappedFile``), each
tensor copied once, straight into its place in the consolidated tensor where the layout allows.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
from argparse import Namespace
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from checkpoints_tools import layout
from checkpoints_tools.safe_load import CheckpointError, MappedFile, safe_torch_load
from checkpoints_tools.workspace import Workspace
from jam_metaseq.models.config import (
    ARCH_CROSS, CrossConfig, DecoderConfig, ModelConfig, config_from_dict,
)

# fairscale/FSDP and activation-checkpoint wrappers leave these in parameter names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_fpw_module.", "_checkpoint_wrapped_module.")
_PART_RE = re.compile(r"^(?P<base>.*?)(?:-model_part-(?P<part>\d+))?(?:-shard(?P<shard>\d+))?\.pt$")


def strip_wrappers(name: str) -> str:
    for p in _WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


def is_version_key(name: str) -> bool:
    return name.endswith(".version") or name == "version"


@dataclass(frozen=True)
class TensorInfo:
    """Consolidated shape and stored dtype of one tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class Reader:
    """A consolidated, read-only, lazy view of one checkpoint (metaseq key names)."""

    path: Path
    format: str = "metaseq"
    mp: int = 1
    fsdp: int = 0
    files: list[Path]
    meta: dict[str, Any]
    _infos: "OrderedDict[str, TensorInfo]"
    bytes_read: int = 0
    """Bytes of tensors read so far (``get_into``; paces the source hashing, ``ops``)."""

    @functools.cached_property
    def tensor_bytes(self) -> int:
        """Bytes of all its tensors (as read: consolidated, in their dtypes)."""
        return sum(i.nbytes for i in self._infos.values())

    def read_fraction(self) -> float:
        """How far through its tensors' bytes this reader's reads are (0..1). Every read goes
        through the outermost reader's ``get_into`` (``_start_read``), views (HF OPT) included."""
        total = self.tensor_bytes
        return min(1.0, self.bytes_read / total) if total else 1.0

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def shapes(self) -> "OrderedDict[str, tuple[int, ...]]":
        return OrderedDict((k, v.shape) for k, v in self._infos.items())

    def get(self, name: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Consolidated ``name`` as a new tensor (``dtype``: cast on the way)."""
        info = self.info(name)
        return self.get_into(name, torch.empty(info.shape, dtype=dtype or info.dtype))

    def _start_read(self, name: str, out: torch.Tensor) -> TensorInfo:
        """``name``'s info, once ``out`` is checked to have its shape; counts the read."""
        info = self.info(name)
        if tuple(out.shape) != info.shape:
            raise CheckpointError(f"{self.path}: tensor {name} has shape {info.shape}, asked into {tuple(out.shape)}")
        self.bytes_read += info.nbytes
        return info

    def get_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read consolidated ``name`` into ``out`` (its shape; any dtype and strides: cast on the
        way). Readers override this (or ``get``; at least one of the two) to fill ``out`` straight from
        the file."""
        self._start_read(name, out)
        return out.copy_(self.get(name))

    def tied(self, a: str, b: str) -> bool:
        """True when ``a`` and ``b`` are stored as one tensor (a tied output projection), so
        anything computed from ``a`` equals the same computed from ``b``."""
        return False

    def items(self, *, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for n in self.names():
            yield n, self.get(n, dtype=dtype)

    @property
    def param_dtype(self) -> torch.dtype:
        """The one floating dtype of the parameters (version buffers ignored)."""
        seen: dict[torch.dtype, str] = {}
        for n, i in self._infos.items():
            if i.dtype.is_floating_point and not is_version_key(n):
                seen.setdefault(i.dtype, n)
        if len(seen) > 1:
            desc = ", ".join(f"{d} ({n})" for d, n in seen.items())
            raise CheckpointError(f"{self.path}: mixed parameter dtypes: {desc}")
        return next(iter(seen), torch.float32)

    def num_params(self) -> int:
        return sum(i.numel for n, i in self._infos.items()
                   if not is_version_key(n) and n != "decoder.output_projection.weight")

    def config(self, **overrides: Any) -> ModelConfig:
        """The model config: stored ``jam_config``, else inferred from ``cfg["model"]`` + shapes."""
        return resolve_config(self, **overrides)

    def vocab_dict(self) -> dict[str, Any] | None:
        v = self.meta.get("jam_vocab")
        task_state = self.meta.get("task_state")
        if v is None and isinstance(task_state, dict):  # fairseq-trained: the task's state
            v = task_state.get("vocab_manifest")
        if v is None and self.path.is_dir() and (self.path / "vocab.json").is_file():
            v = json.loads((self.path / "vocab.json").read_text())
        return v

    def close(self) -> None:  # mapped files are released when the reader is dropped
        pass

    def describe(self) -> str:
        lay = f"MP={self.mp}" + (f", FSDP shards={self.fsdp}" if self.fsdp else "")
        return f"{self.format} ({lay}, {len(self.files)} file(s))"


# ---- metaseq / fairseq .pt ---------------------------------------------------------------------


@dataclass
class _FlatSlot:
    """Where one original parameter lives inside an FSDP flat parameter of one rank."""

    flat_key: str
    offset: int
    numel: int
    shape: tuple[int, ...]


@dataclass
class _RankSource:
    """One model-parallel rank: its shard files' model dicts (mmap) and the FSDP index."""

    files: list[Path]
    models: list[Mapping[str, torch.Tensor]]
    mapped: list[MappedFile] = field(default_factory=list)
    pads: list[dict[str, int]] = field(default_factory=list)  # per shard: flat_key -> padding
    slots: dict[str, _FlatSlot] = field(default_factory=dict)  # param name -> where
    plain: dict[str, str] = field(default_factory=dict)  # name -> key in models[0] (unflattened)
    flat_only_rank0: set[str] = field(default_factory=set)


class MetaseqReader(Reader):
    """metaseq/fairseq ``.pt`` files: consolidated, MP parts, FSDP shards or both."""

    def __init__(self, groups: dict[int, dict[int, Path]], *, path: Path, trust_pickle: bool,
                 fsdp: bool) -> None:
        self.path = path
        self.format = "metaseq"
        self.mp = len(groups)
        self.fsdp = len(next(iter(groups.values()))) if fsdp else 0
        self.files = [f for r in sorted(groups) for _, f in sorted(groups[r].items())]
        self.meta = {}
        self._ws = Workspace()  # scratch for pieces that cannot be read straight into place
        self._ranks: list[_RankSource] = []
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
                             if k not in ("model", "last_optimizer_state", "shard_metadata")}
            src = _RankSource(files=files, models=[o["model"] for o in loaded],
                              mapped=[MappedFile(f) for f in files])
            if fsdp:
                self._index_fsdp(src, [o.get("shard_metadata") for o in loaded])
            else:
                src.plain = {strip_wrappers(k): k for k in src.models[0]}
            self._ranks.append(src)
            del loaded
        self._check_expected_counts()
        self._infos = self._build_infos()

    # -- FSDP index --------------------------------------------------------------------------
    def _index_fsdp(self, src: _RankSource, metas: list[Any]) -> None:
        for f, m in zip(src.files, metas):
            if not m or "param_metadata" not in m:
                raise CheckpointError(f"{f}: FSDP shard without 'shard_metadata'")
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
                key = self._find_key(src.models[0], flat_key, src.files[0])
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
                    src.slots[full] = _FlatSlot(flat_key=key, offset=off, numel=int(k),
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
            key = self._find_key(src.models[0], b, src.files[0])
            src.plain[strip_wrappers(b)] = key

    @staticmethod
    def _find_key(model: Mapping[str, Any], key: str, f: Path) -> str:
        if key in model:
            return key
        stripped = {strip_wrappers(k): k for k in model}
        if strip_wrappers(key) in stripped:
            return stripped[strip_wrappers(key)]
        raise CheckpointError(f"{f}: shard_metadata names {key!r} but the state dict has no such key")

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
    def _rank_entries(self, src: _RankSource) -> "OrderedDict[str, tuple[tuple[int, ...], torch.dtype]]":
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
            infos[n] = TensorInfo(layout.full_shape(n, shapes[0], self.mp), dtypes.pop())
        return infos

    # -- reading -----------------------------------------------------------------------------
    def _rank_view_pieces(self, src: _RankSource, name: str) -> list[tuple[int, torch.Tensor, slice]]:
        """(shard index, mapped view, where it goes in the rank's flat tensor) of one rank's tensor."""
        if name in src.plain:
            return [(0, src.models[0][src.plain[name]], slice(None))]
        slot = src.slots[name]
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

    def _rank_tensor(self, src: _RankSource, name: str, dtype: torch.dtype | None,
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
        if self.mp == 1 or layout.rule_for(name) == "replicated":
            return self._rank_tensor(self._ranks[0], name, None, dest=out)
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

    def get_rank_piece(self, name: str, rank: int) -> torch.Tensor:
        return self._rank_tensor(self._ranks[rank], name, None)


# ---- safetensors -------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_DTYPE_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header dict, byte offset where data starts)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt safetensors header length {n}")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    data_start = 8 + n
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if data_start + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, header needs {data_start + end})")
    return header, data_start


class SafetensorsReader(Reader):
    """One or more safetensors files (``model.safetensors`` or an index); read with ``pread``."""

    def __init__(self, files: Sequence[Path], *, path: Path) -> None:
        self.path = path
        self.format = "safetensors"
        self.files = list(files)
        self.meta = {}
        self._where: dict[str, tuple[Path, int, int, int]] = {}
        self._ws = Workspace()
        self._infos = OrderedDict()
        for f in self.files:
            header, start = read_safetensors_header(f)
            md = header.pop("__metadata__", None) or {}
            for k, v in md.items():
                if k in ("jam_config", "jam_vocab"):
                    self.meta[k] = json.loads(v)
            for k, v in header.items():
                if v["dtype"] not in _ST_DTYPES:
                    raise CheckpointError(f"{f}: tensor {k} has unsupported dtype {v['dtype']}")
                dt = _ST_DTYPES[v["dtype"]]
                a, b = v["data_offsets"]
                info = TensorInfo(tuple(int(s) for s in v["shape"]), dt)
                if b - a != info.nbytes:
                    raise CheckpointError(f"{f}: tensor {k}: {b - a} bytes for shape {info.shape} {dt}")
                self._infos[k] = info
                self._where[k] = (f, start + a, b - a, 0)

    def get_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        info = self._start_read(name, out)
        f, off, n, _ = self._where[name]
        direct = out.dtype == info.dtype and out.is_contiguous()
        buf = out if direct else self._ws.get("read", info.shape, info.dtype)
        if n:
            view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
            with open(f, "rb") as fh:
                got = 0
                while got < n:
                    k = os.preadv(fh.fileno(), [view[got:]], off + got)
                    if k <= 0:
                        raise CheckpointError(f"{f}: truncated while reading tensor {name}")
                    got += k
        return out if direct else out.copy_(buf)


# ---- layout detection --------------------------------------------------------------------------


def _group_pt(files: Sequence[Path]) -> dict[str, dict[int, dict[int, Path]]]:
    """base -> part -> shard -> file (missing part/shard numbers = -1 for "none")."""
    out: dict[str, dict[int, dict[int, Path]]] = {}
    for f in files:
        m = _PART_RE.match(f.name)
        if not m:
            continue
        part = int(m["part"]) if m["part"] is not None else -1
        shard = int(m["shard"]) if m["shard"] is not None else -1
        out.setdefault(m["base"], {}).setdefault(part, {})[shard] = f
    return out


def _validate_groups(base: Path, groups: dict[int, dict[int, Path]]) -> tuple[dict[int, dict[int, Path]], bool]:
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


def open_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> Reader:
    """Open any supported checkpoint layout lazily. HF OPT directories/files come back already
    converted to metaseq names (``convert_hf.HFOptReader``)."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file() and _hf_weight_files(path):
            from checkpoints_tools.convert_hf import HFOptReader
            return HFOptReader(path, trust_pickle=trust_pickle)
        st = sorted(path.glob("*.safetensors"))
        pts = sorted(path.glob("*.pt"))
        if st and not pts:
            return _maybe_hf(SafetensorsReader(st, path=path), path)
        if not pts:
            raise CheckpointError(f"{path}: no .pt or .safetensors checkpoint in this directory")
        grouped = _group_pt(pts)
        if len(grouped) > 1:
            raise CheckpointError(f"{path}: several checkpoints ({', '.join(sorted(grouped))}); name one file")
        base = next(iter(grouped))
        groups, fsdp = _validate_groups(path / base, grouped[base])
        return _maybe_hf(MetaseqReader(groups, path=path, trust_pickle=trust_pickle, fsdp=fsdp), path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        return _maybe_hf(SafetensorsReader([path], path=path), path)
    if path.name.endswith(".safetensors.index.json"):
        idx = json.loads(path.read_text())
        files = sorted({path.parent / f for f in idx["weight_map"].values()})
        return _maybe_hf(SafetensorsReader(files, path=path), path)
    # .pt / .bin: the file itself, or metaseq's restore-file convention X.pt -> X-model_part-*.pt
    m = _PART_RE.match(path.name if path.suffix == ".pt" else path.stem + ".pt")
    if path.suffix != ".pt" and path.is_file():
        return _maybe_hf(MetaseqReader({0: {0: path}}, path=path, trust_pickle=trust_pickle, fsdp=False),
                         path)
    if not m:
        raise CheckpointError(f"{path}: not a .pt/.safetensors checkpoint path")
    base = m["base"]
    siblings = [f for f in path.parent.glob(f"{glob_escape(base)}*.pt") if _PART_RE.match(f.name)
                and _PART_RE.match(f.name)["base"] == base]
    if path.is_file() and m["part"] is None and m["shard"] is None:
        siblings = [path]
    if not siblings:
        raise CheckpointError(f"{path}: no such file (and no {base}-model_part-*/-shard* files)")
    groups, fsdp = _validate_groups(path.parent / base, _group_pt(siblings)[base])
    return _maybe_hf(MetaseqReader(groups, path=path, trust_pickle=trust_pickle, fsdp=fsdp), path)


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


def _hf_weight_files(path: Path) -> list[Path]:
    pats = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json")
    return [path / p for p in pats if (path / p).is_file()]


def _maybe_hf(reader: Reader, path: Path) -> Reader:
    """State dicts with HF OPT key names are viewed through the HF -> metaseq key map."""
    names = reader.names()
    if any(n.startswith(("model.decoder.", "decoder.layers.0.self_attn.q_proj")) for n in names) and \
            not any(n.endswith("qkv_proj.weight") for n in names):
        from checkpoints_tools.convert_hf import HFOptReader
        return HFOptReader.from_reader(reader, path=path)
    return reader


# ---- configs -----------------------------------------------------------------------------------


def resolve_config(reader: Reader, **overrides: Any) -> ModelConfig:
    d = reader.meta.get("jam_config")
    task_state = reader.meta.get("task_state")
    if d is None and isinstance(task_state, dict):
        d = task_state.get("jam_config")
    if d is None and reader.path.is_dir() and (reader.path / "manifest.json").is_file():
        d = json.loads((reader.path / "manifest.json").read_text()).get("config")
    if d is not None:
        cfg = config_from_dict(d)
        return cfg
    ns = None
    cfg_dict = reader.meta.get("cfg")
    if isinstance(cfg_dict, dict):
        ns = cfg_dict.get("model")
    if ns is None:
        ns = reader.meta.get("args")
    if isinstance(ns, dict):
        ns = Namespace(**ns)
    stored = getattr(ns, "jam_config", None) if ns is not None else None
    if stored:
        return config_from_dict(dict(stored))
    return infer_config(reader.shapes(), ns, source=str(reader.path), **overrides)


def infer_config(shapes: Mapping[str, Sequence[int]], ns: Namespace | None = None, *,
                 source: str = "checkpoint", **overrides: Any) -> ModelConfig:
    """A config from state-dict shapes plus metaseq/fairseq model args (heads come from args or
    ``overrides``; shapes cannot tell them)."""
    g = (lambda k, d=None: getattr(ns, k, d)) if ns is not None else (lambda k, d=None: d)
    cross = any(k.startswith("decoder.layers_llm.") for k in shapes)
    lay = "decoder.layers_llm." if cross else "decoder.layers."
    if "decoder.embed_tokens.weight" not in shapes:
        raise CheckpointError(f"{source}: no decoder.embed_tokens.weight: not a decoder checkpoint")
    vocab, embed = shapes["decoder.embed_tokens.weight"]
    layers = 1 + max((int(k[len(lay):].split(".")[0]) for k in shapes if k.startswith(lay)), default=-1)
    fc1 = shapes.get(f"{lay}0.fc1.weight")
    if fc1 is None:
        raise CheckpointError(f"{source}: no {lay}0.fc1.weight")
    pos_key = "decoder.embed_positions_llm.weight" if cross else "decoder.embed_positions.weight"
    if cross and pos_key not in shapes:
        pos_key = "decoder.embed_positions_cm3.weight"
    padding_idx = int(overrides.get("padding_idx", 1))
    heads = overrides.get("heads") or g("decoder_attention_heads")
    if not heads:
        raise CheckpointError(f"{source}: the number of attention heads is not stored; pass --heads")
    act = overrides.get("activation") or g("activation_fn", "relu")
    parent = DecoderConfig(
        vocab_size=int(vocab), embed_dim=int(embed), ffn_dim=int(fc1[0]), layers=layers, heads=int(heads),
        max_positions=int(shapes[pos_key][0]) - padding_idx - 1 if pos_key in shapes else 2048,
        padding_idx=padding_idx,
        bias=f"{lay}0.fc1.bias" in shapes,
        affine_ln="decoder.layer_norm.weight" in shapes,
        activation=act if act in ("relu", "gelu") else "relu",
        scale_embedding=bool(overrides.get("scale_embedding", not g("no_scale_embedding", False))),
        dropout=float(g("dropout", 0.0) or 0.0),
        attention_dropout=float(g("attention_dropout", 0.0) or 0.0),
    )
    if not cross:
        return parent
    every = overrides.get("cross_every") or g("cross_every")
    if every is None:
        pairs = len({k.split(".")[2] for k in shapes if k.startswith("decoder.x_attn_layers_llm.")})
        every = 0 if pairs == 0 else (layers if pairs == 1 else -(-layers // pairs))
    return CrossConfig(parent=parent, cross_every=int(every),
                       image_vocab_start=int(g("image_vocab_start", -1)),
                       image_vocab_end=int(g("image_vocab_end", -1)))


def arch_of(cfg: ModelConfig) -> str:
    return ARCH_CROSS if isinstance(cfg, CrossConfig) else cfg.arch

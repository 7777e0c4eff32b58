"""Lazy checkpoint readers: every supported layout seen as one consolidated (MP=1) state dict.

Layouts (``docs/CHECKPOINTS.md``, Files): a consolidated ``X.pt``; model-parallel parts
``X-model_part-{r}.pt``; FSDP shards ``X-shard{j}.pt`` with ``shard_metadata`` (fairseq: ``fsdp_metadata``); both
(``X-model_part-{r}-shard{j}.pt``); safetensors files (single or indexed); HF OPT directories
(``HFOptReader``: converted on the fly by ``convert_hf``'s key maps). ``open_checkpoint(path)`` picks the layout and returns
a ``Reader`` whose ``get(name)`` materialises one consolidated tensor at a time: MP pieces are
joined with ``layout.join``, FSDP flat parameters are unpadded and cut by offset without ever
building the whole flat vector; bytes are read with pread (``safe_load.MappedFile``), each
tensor copied once, straight into its place in the consolidated tensor where the layout allows.
Nothing in a file is trusted: safetensors headers are validated as the reference library does
(``read_safetensors_header``), torch zip records are checked against their pickle
(``safe_load.check_torch_zip``), a parameter stored with an integer dtype is refused, and the
model-parallel copies of a replicated tensor must agree (``REPLICA_MISMATCH``); every error
names the file and the tensor.
"""

from __future__ import annotations

import dataclasses

import functools
import json
import os
import re
import struct
import warnings
from argparse import Namespace
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from checkpoints_tools import layout
from checkpoints_tools.convert_hf import HF_QKV, KEY_MAP, QKV, config_from_hf, is_hf_opt_name
from checkpoints_tools.safe_load import CheckpointError, MappedFile, safe_torch_load
from checkpoints_tools.workspace import Workspace
from jam_metaseq.models import keys
from jam_metaseq.models.config import (
    ARCH_CROSS, CrossConfig, DecoderConfig, ModelConfig, config_from_dict,
)

# fairscale/FSDP and activation-checkpoint wrappers leave these in parameter names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_fpw_module.", "_checkpoint_wrapped_module.")
FSDP_METADATA_KEYS = ("shard_metadata", "fsdp_metadata")
"""Where an FSDP shard file keeps fairscale's ``local_metadata_dict()`` (flat parameters per unit,
padding, shared parameters, buffers): metaseq's trainer saves it as ``shard_metadata``, fairseq's
as ``fsdp_metadata``; the contents are the same."""
_PART_RE = re.compile(r"^(?P<base>.*?)(?:-model_part-(?P<part>\d+))?(?:-shard(?P<shard>\d+))?\.pt$")


def strip_wrappers(name: str) -> str:
    for p in _WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


def is_version_key(name: str) -> bool:
    return name.endswith(".version") or name == "version"


def check_parameter_dtype(path: Path, name: str, dtype: torch.dtype) -> None:
    """Every tensor of these models but a version counter is a floating-point parameter: an
    integer or bool dtype on one means a relabelled or corrupt file, whose bytes would be read
    as other numbers."""
    if not dtype.is_floating_point and not is_version_key(name):
        raise CheckpointError(f"{path}: tensor {name!r} is stored as {str(dtype).replace('torch.', '')}, but it is "
                              "a floating-point parameter (relabelled or corrupt?)")


REPLICA_MISMATCH = ("error", "warn")
"""What reading a replicated tensor does when the model-parallel parts hold different copies:
``error`` stops, ``warn`` warns (naming the tensor and the largest difference) and uses part 0."""


class ReplicaMismatchWarning(UserWarning):
    """The model-parallel parts of a checkpoint hold different copies of a replicated tensor."""


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

    def prefetch(self, name: str) -> None:
        """Ask the OS to start reading ``name``'s bytes now (a hint; no-op where unknown), so a
        cold disk works while the caller computes and writes the tensor before it."""

    def _willneed(self, path: Path, offset: int, nbytes: int) -> None:
        if nbytes <= 0 or not hasattr(os, "posix_fadvise"):
            return
        fds = self.__dict__.setdefault("_prefetch_fds", {})
        try:
            fd = fds.get(path)
            if fd is None:
                fd = fds[path] = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:  # a hint only: the read itself reports real errors
            pass

    def __del__(self) -> None:
        for fd in self.__dict__.get("_prefetch_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

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
        """The model config: stored ``jam_config`` (or a trained checkpoint's task state, the jam-ckpt
    manifest, ``cfg["model"].jam_config``, a ``config.json`` of ours beside it), else inferred from
    ``cfg["model"]`` + shapes (``resolve_config``)."""
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


def _fsdp_metadata(obj: Mapping[str, Any]) -> Any:
    return next((obj[k] for k in FSDP_METADATA_KEYS if obj.get(k) is not None), None)


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
                             if k not in ("model", "last_optimizer_state", *FSDP_METADATA_KEYS)}
            src = _RankSource(files=files, models=[o["model"] for o in loaded],
                              mapped=[MappedFile(f) for f in files])
            if fsdp:
                self._index_fsdp(src, [_fsdp_metadata(o) for o in loaded])
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
        self._index_tied_aliases(src)

    @staticmethod
    def _index_tied_aliases(src: _RankSource) -> None:
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
            dtype = dtypes.pop()
            check_parameter_dtype(self._ranks[0].files[0], n, dtype)
            infos[n] = TensorInfo(layout.full_shape(n, shapes[0], self.mp), dtype)
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
        return self._rank_tensor(self._ranks[rank], name, None)


# ---- safetensors -------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_DTYPE_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_ST_OTHER_DTYPES = ("F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "E8M0", "C64")
"""Dtypes the safetensors format knows but torch cannot hold as one tensor per element here."""
ST_MAX_HEADER = 100_000_000
"""The safetensors library's limit on the JSON header (bytes)."""


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a safetensors header: its dtype, shape and byte range in the data buffer."""

    info: TensorInfo
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header: the tensors in file order, ``__metadata__`` and where the
    data buffer starts."""

    tensors: "OrderedDict[str, SafetensorsEntry]"
    metadata: dict[str, str]
    data_start: int


def _json_object_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file as the reference ``safetensors``
    library does (whatever it refuses, this refuses; a few things it accepts are refused too:
    duplicate JSON keys and dtypes torch has no type for). Checked: the 8-byte header length is
    within the file and under ``ST_MAX_HEADER``; the header is UTF-8 JSON, an object; each
    entry has a known ``dtype``, a ``shape`` of non-negative integers and two integer
    ``data_offsets`` [begin, end] with end - begin = elements x item size; sorted by offset,
    the tensors tile the data buffer exactly (no overlap, no gap, nothing after the last);
    ``__metadata__`` maps strings to strings. Every error names the file (and the tensor)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes: no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > ST_MAX_HEADER:
            raise CheckpointError(f"{path}: safetensors header length {n} is over the {ST_MAX_HEADER}-byte "
                                  "limit (corrupt, or not a safetensors file)")
        if 8 + n > size:
            raise CheckpointError(f"{path}: safetensors header length {n} runs past the end of the file "
                                  f"({size} bytes): truncated, or not a safetensors file")
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: safetensors header is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_json_object_no_duplicates, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object")
    data_start = 8 + n
    data_size = size - data_start
    md = header.pop("__metadata__", None)
    if md is None:
        md = {}
    if not isinstance(md, dict):
        raise CheckpointError(f"{path}: safetensors __metadata__ is a JSON {type(md).__name__}, not an object")
    for k, v in md.items():
        if not isinstance(v, str):
            raise CheckpointError(f"{path}: safetensors __metadata__ {k!r} is a {type(v).__name__}, not a string")
    tensors: OrderedDict[str, SafetensorsEntry] = OrderedDict()
    for k, v in header.items():
        where = f"{path}: tensor {k!r}"
        if not isinstance(v, dict):
            raise CheckpointError(f"{where}: header entry is a JSON {type(v).__name__}, not an object")
        for fld in ("dtype", "shape", "data_offsets"):
            if fld not in v:
                raise CheckpointError(f"{where}: header entry has no {fld!r}")
        dt_name, shape, offsets = v["dtype"], v["shape"], v["data_offsets"]
        if not isinstance(dt_name, str) or dt_name not in _ST_DTYPES:
            if isinstance(dt_name, str) and dt_name in _ST_OTHER_DTYPES:
                raise CheckpointError(f"{where}: dtype {dt_name} is not supported here")
            raise CheckpointError(f"{where}: unknown dtype {dt_name!r}")
        if not isinstance(shape, list) or not all(_is_uint(s) for s in shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end] with integers >= 0")
        info = TensorInfo(tuple(shape), _ST_DTYPES[dt_name])
        begin, end = offsets
        if end < begin:
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
        if end > data_size:
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] run past the {data_size} bytes of "
                                  "data in the file (truncated?)")
        if end - begin != info.nbytes:
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes, but shape "
                                  f"{list(info.shape)} of {dt_name} needs {info.nbytes}")
        tensors[k] = SafetensorsEntry(info, begin, end)
    pos, prev = 0, None
    for k, e in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin < pos:
            raise CheckpointError(f"{path}: tensor {k!r}: data_offsets [{e.begin}, {e.end}] overlap tensor {prev!r} "
                                  f"(which ends at {pos})")
        if e.begin > pos:
            raise CheckpointError(f"{path}: tensor {k!r}: data_offsets begin at {e.begin}, leaving bytes "
                                  f"[{pos}, {e.begin}) of the data unused (a gap)")
        pos, prev = e.end, k
    if pos != data_size:
        raise CheckpointError(f"{path}: the tensors cover {pos} of the {data_size} bytes of data: "
                              f"{data_size - pos} trailing bytes belong to no tensor")
    return SafetensorsHeader(tensors, md, data_start)


def read_safetensors_index(path: Path) -> dict[str, Path]:
    """The ``weight_map`` of a ``*.safetensors.index.json`` (or HF's ``pytorch_model.bin.index.json``, the
    same format): tensor -> file next to the index, validated."""
    try:
        idx = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the index ({e})") from None
    wm = idx.get("weight_map") if isinstance(idx, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError(f"{path}: index has no \"weight_map\" object of tensor -> file name")
    out = {}
    for k, v in wm.items():
        p = Path(v)
        if p.is_absolute() or ".." in p.parts:
            raise CheckpointError(f"{path}: weight_map names {v!r} for {k!r}: not a file next to the index")
        out[k] = path.parent / p
    return out


class SafetensorsReader(Reader):
    """One or more safetensors files (``model.safetensors`` or an index); read with ``pread``.
    Headers are validated (``read_safetensors_header``), and a tensor whose dtype is not
    floating point must be a version counter: parameters are floating point, so an integer
    dtype on one means a relabelled or corrupt header. ``weight_map``: an index's tensor ->
    file, checked against the headers. A ``__metadata__`` entry ``NAME: STORED`` where NAME is
    no tensor of the file and STORED is one (how ``safetensors.torch.save_model`` and jam-ckpt
    record a tied tensor stored once) makes NAME an alias of STORED (``tied``)."""

    def __init__(self, files: Sequence[Path], *, path: Path, weight_map: Mapping[str, Path] | None = None) -> None:
        self.path = path
        self.format = "safetensors"
        self.files = list(files)
        self.meta = {}
        self._where: dict[str, tuple[Path, int, int, int]] = {}
        self._ws = Workspace()
        self._infos = OrderedDict()
        for f in self.files:
            if not f.is_file():
                raise CheckpointError(f"{f}: no such file" + (f" (named by {path})" if path != f else ""))
            header = read_safetensors_header(f)
            for k, v in header.metadata.items():
                if k in ("jam_config", "jam_vocab"):
                    try:
                        self.meta[k] = json.loads(v)
                    except ValueError as e:
                        raise CheckpointError(f"{f}: __metadata__ {k} is not valid JSON ({e})") from None
            for k, e in header.tensors.items():
                if k in self._infos:
                    raise CheckpointError(f"{f}: tensor {k!r} is also in {self._where[k][0]}")
                check_parameter_dtype(f, k, e.info.dtype)
                self._infos[k] = e.info
                self._where[k] = (f, header.data_start + e.begin, e.end - e.begin, 0)
            for k, v in header.metadata.items():  # safetensors' record of a dropped shared tensor
                if k not in header.tensors and v in header.tensors and k not in ("format", "jam_config", "jam_vocab"):
                    self.meta.setdefault("aliases", {})[k] = v
        self._aliases: dict[str, str] = {}
        for k, v in self.meta.pop("aliases", {}).items():
            self._aliases[k] = v
            self._infos[k] = self._infos[v]
            self._where[k] = self._where[v]
        if weight_map is not None:
            for k, f in weight_map.items():
                if k not in self._where or self._where[k][0] != f:
                    where = self._where[k][0] if k in self._where else "no file"
                    raise CheckpointError(f"{path}: weight_map puts tensor {k!r} in {f.name}, found in {where}")
            extra = [k for k in self._infos if k not in weight_map and k not in self._aliases]
            if extra:
                raise CheckpointError(f"{path}: tensor(s) {extra[:3]} are in the files but not in weight_map")

    def tied(self, a: str, b: str) -> bool:
        """One stored tensor under both names: ``__metadata__`` names one of them as the other
        (``safetensors.torch.save_model``'s record of a shared tensor it stored once)."""
        return a in self._infos and b in self._infos and self._aliases.get(a, a) == self._aliases.get(b, b)

    def prefetch(self, name: str) -> None:
        if name in self._where:
            f, off, n, _ = self._where[name]
            self._willneed(f, off, n)

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


def open_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False,
                    replica_mismatch: str = "error") -> Reader:
    """Open any supported checkpoint layout lazily. HF OPT directories/files come back already
    converted to metaseq names (``HFOptReader``). ``replica_mismatch``: see
    ``REPLICA_MISMATCH`` (model-parallel parts whose replicated tensors differ)."""
    path = Path(path)
    mkw = {"trust_pickle": trust_pickle, "replica_mismatch": replica_mismatch}
    if path.is_dir():
        if (path / "config.json").is_file() and _hf_weight_files(path):
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
        return _maybe_hf(MetaseqReader(groups, path=path, fsdp=fsdp, **mkw), path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        return _maybe_hf(SafetensorsReader([path], path=path), path)
    if path.name.endswith(".safetensors.index.json"):
        wm = read_safetensors_index(path)
        return _maybe_hf(SafetensorsReader(sorted(set(wm.values())), path=path, weight_map=wm), path)
    # .pt / .bin: the file itself, or metaseq's restore-file convention X.pt -> X-model_part-*.pt
    m = _PART_RE.match(path.name if path.suffix == ".pt" else path.stem + ".pt")
    if path.suffix != ".pt" and path.is_file():
        return _maybe_hf(MetaseqReader({0: {0: path}}, path=path, fsdp=False, **mkw), path)
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
    return _maybe_hf(MetaseqReader(groups, path=path, fsdp=fsdp, **mkw), path)


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


def _hf_weight_files(path: Path) -> list[Path]:
    pats = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json")
    return [path / p for p in pats if (path / p).is_file()]


def _maybe_hf(reader: Reader, path: Path) -> Reader:
    """State dicts with HF OPT key names are viewed through the HF -> metaseq key map."""
    names = reader.names()
    if any(n.startswith(("model.decoder.", f"{keys.LAYERS}.0.self_attn.q_proj")) for n in names) and \
            not any(n.endswith(f"{keys.QKV}.weight") for n in names):
        return HFOptReader.from_reader(reader, path=path)
    return reader


# ---- HF OPT --------------------------------------------------------------------------------------


class HFOptReader(Reader):
    """An HF OPT checkpoint seen with metaseq names (q/k/v fused on read)."""

    def __init__(self, path: str | os.PathLike, *, trust_pickle: bool = False) -> None:
        path = Path(path)
        files: list[Path]
        if (path / "model.safetensors.index.json").is_file():
            wm = read_safetensors_index(path / "model.safetensors.index.json")
            raw: Reader = SafetensorsReader(sorted(set(wm.values())), path=path, weight_map=wm)
        elif (path / "model.safetensors").is_file():
            raw = SafetensorsReader([path / "model.safetensors"], path=path)
        elif (path / "pytorch_model.bin.index.json").is_file():
            files = sorted(set(read_safetensors_index(path / "pytorch_model.bin.index.json").values()))
            raw = _MultiReader([MetaseqReader({0: {0: f}}, path=f, trust_pickle=trust_pickle, fsdp=False)
                                for f in files], path=path)
        elif (path / "pytorch_model.bin").is_file():
            raw = MetaseqReader({0: {0: path / "pytorch_model.bin"}}, path=path, trust_pickle=trust_pickle,
                                fsdp=False)
        else:
            raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin")
        self._init(raw, path, json.loads((path / "config.json").read_text()), str(path / "config.json"))

    @classmethod
    def from_reader(cls, raw: Reader, *, path: Path) -> "HFOptReader":
        self = cls.__new__(cls)
        cfg_file = (path if path.is_dir() else path.parent) / "config.json"
        hf = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None
        self._init(raw, path, hf, str(cfg_file))
        return self

    def _init(self, raw: Reader, path: Path, hf: Mapping[str, Any] | None, source: str) -> None:
        self.raw, self.path, self.format = raw, path, "hf_opt"
        self.mp, self.fsdp, self.files = 1, 0, list(raw.files)
        self.meta = dict(raw.meta)
        self.hf_config = dict(hf) if hf else None
        names = raw.names()
        self.prefix = "model." if any(n.startswith("model.decoder.") for n in names) else ""
        self._hf_cfg = config_from_hf(hf, source=source) if hf else None
        self._map: dict[str, Any] = {}
        self._infos = OrderedDict()
        p = self.prefix
        version = TensorInfo((1,), torch.float32)
        self._infos["decoder.version"] = version
        for ms_name, hf_tpl in KEY_MAP.items():
            if hf_tpl is None:
                continue
            if "{}" not in ms_name:
                if p + hf_tpl in raw:
                    self._map[ms_name] = p + hf_tpl
                    self._infos[ms_name] = raw.info(p + hf_tpl)
        layers = sorted({int(n[len(p) + len("decoder.layers."):].split(".")[0]) for n in names
                         if n.startswith(p + "decoder.layers.")})
        # metaseq order: embeddings, then per layer, then final LN, then output projection.
        ordered: OrderedDict[str, TensorInfo] = OrderedDict()
        for k in ("decoder.version", "decoder.embed_tokens.weight", "decoder.embed_positions.weight"):
            if k in self._infos:
                ordered[k] = self._infos[k]
        for i in layers:
            for kind in ("weight", "bias"):
                parts = [p + t.format(i, kind) for t in HF_QKV]
                if all(x in raw for x in parts):
                    infos = [raw.info(x) for x in parts]
                    name = QKV.format(i, kind)
                    self._map[name] = parts
                    ordered[name] = TensorInfo((3 * infos[0].shape[0], *infos[0].shape[1:]), infos[0].dtype)
            for ms_tpl, hf_tpl in KEY_MAP.items():
                if hf_tpl is None or "{}" not in ms_tpl:
                    continue
                src = p + hf_tpl.format(i)
                if src in raw:
                    self._map[ms_tpl.format(i)] = src
                    ordered[ms_tpl.format(i)] = raw.info(src)
        for k in ("decoder.layer_norm.weight", "decoder.layer_norm.bias"):
            if k in self._infos:
                ordered[k] = self._infos[k]
        emb = ordered.get("decoder.embed_tokens.weight")
        if emb is None:
            raise CheckpointError(f"{path}: no {p}decoder.embed_tokens.weight: not an OPT checkpoint")
        ordered["decoder.output_projection.weight"] = emb
        self._map["decoder.output_projection.weight"] = self._map["decoder.embed_tokens.weight"]
        ordered["decoder.version"] = TensorInfo((1,), emb.dtype)
        self._infos = ordered
        unknown = [n for n in names if not is_hf_opt_name(n[len(p):] if n.startswith(p) else n)]
        if unknown:
            raise CheckpointError(f"{path}: HF tensor(s) with no metaseq equivalent: {unknown[:3]}")

    def config(self, **overrides: Any) -> ModelConfig:
        if self._hf_cfg is not None:
            return self._hf_cfg
        return super().config(**overrides)

    def tied(self, a: str, b: str) -> bool:
        return a in self._map and self._map.get(a) == self._map.get(b)  # HF OPT: lm_head = embed_tokens

    def get(self, name: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        info = self.info(name)
        if name == "decoder.version":
            return torch.tensor([3.0], dtype=dtype or info.dtype)
        src = self._map[name]
        if isinstance(src, list):
            return torch.cat([self.raw.get(s, dtype=dtype) for s in src], dim=0)
        return self.raw.get(src, dtype=dtype)


class _MultiReader(Reader):
    """Several files (an HF ``.bin`` index) as one name space."""

    def __init__(self, readers: Sequence[Reader], *, path: Path) -> None:
        self.path, self.format, self.files, self.meta = path, "multi", [], {}
        self._owner: dict[str, Reader] = {}
        self._infos = OrderedDict()
        for r in readers:
            self.files += r.files
            for n in r.names():
                self._owner[n] = r
                self._infos[n] = r.info(n)

    def get(self, name: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._owner[name].get(name, dtype=dtype)


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
    beside = _config_beside(reader)
    if beside is not None:
        return config_from_dict(beside)
    return infer_config(reader.shapes(), ns, source=str(reader.path), **overrides)


def _config_beside(reader: Reader) -> dict[str, Any] | None:
    """A ``config.json`` of ours (``config_to_json``: it names its ``type``) in the checkpoint's
    directory or beside its file; an HF ``config.json`` is not one (``HFOptReader`` reads those)."""
    side = (reader.path if reader.path.is_dir() else reader.path.parent) / "config.json"
    if not side.is_file():
        return None
    try:
        d = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{side}: not a JSON model config ({e})") from None
    return d if isinstance(d, dict) and d.get("type") in ("DecoderConfig", "CrossConfig") else None


def infer_config(shapes: Mapping[str, Sequence[int]], ns: Namespace | None = None, *,
                 source: str = "checkpoint", **overrides: Any) -> ModelConfig:
    """A config from state-dict shapes plus metaseq/fairseq model args (heads come from args or
    ``overrides``; shapes cannot tell them)."""
    g = (lambda k, d=None: getattr(ns, k, d)) if ns is not None else (lambda k, d=None: d)
    cross = bool(keys.block_indices(shapes, keys.BRANCH_LAYERS["llm"]))
    lay = keys.BRANCH_LAYERS["llm"] if cross else keys.LAYERS
    emb_key = keys.BRANCH_EMBED["llm"] if cross and keys.BRANCH_EMBED["llm"] in shapes else keys.EMBED
    if emb_key not in shapes:
        raise CheckpointError(f"{source}: no {keys.EMBED}: not a decoder checkpoint")
    vocab, embed = shapes[emb_key]
    layers = 1 + max(keys.block_indices(shapes, lay), default=-1)
    fc1 = shapes.get(f"{lay}.0.{keys.FC1}.weight")
    if fc1 is None:
        raise CheckpointError(f"{source}: no {lay}.0.{keys.FC1}.weight")
    pos_key = keys.BRANCH_POSITIONS["llm"] if cross else keys.POSITIONS
    if cross and pos_key not in shapes:
        pos_key = keys.BRANCH_POSITIONS["img"]
    padding_idx = int(overrides.get("padding_idx", 1))
    heads = overrides.get("heads") or g("decoder_attention_heads")
    if not heads:
        raise CheckpointError(f"{source}: the number of attention heads is not stored; pass --heads")
    act = overrides.get("activation") or g("activation_fn", "relu")
    parent = DecoderConfig(
        vocab_size=int(vocab), embed_dim=int(embed), ffn_dim=int(fc1[0]), layers=layers, heads=int(heads),
        max_positions=int(shapes[pos_key][0]) - padding_idx - 1 if pos_key in shapes else 2048,
        padding_idx=padding_idx,
        bias=f"{lay}.0.{keys.FC1}.bias" in shapes,
        affine_ln=keys.FINAL_NORM[0].name in shapes,
        activation=act if act in ("relu", "gelu") else "relu",
        scale_embedding=bool(overrides.get("scale_embedding", not g("no_scale_embedding", False))),
        dropout=float(g("dropout", 0.0) or 0.0),
        attention_dropout=float(g("attention_dropout", 0.0) or 0.0),
    )
    if not cross:
        return parent
    # the image branch: its own shape when the parents differed in size (asymmetric JAM-Cross)
    img_lay = keys.BRANCH_LAYERS["img"]
    img_fc1 = shapes.get(f"{img_lay}.0.{keys.FC1}.weight", fc1)
    img_layers = 1 + max(keys.block_indices(shapes, img_lay), default=layers - 1)
    img_shape = {"embed_dim": int(img_fc1[1]), "ffn_dim": int(img_fc1[0]), "layers": img_layers}
    image_parent = None
    img_heads = overrides.get("img_heads") or g("img_attention_heads")
    if any(img_shape[f] != getattr(parent, f) for f in img_shape) or img_heads:
        if not img_heads:  # shapes cannot tell heads, and the LLM's may divide the width by chance
            raise CheckpointError(f"{source}: the image branch ({img_shape['layers']} layers, width "
                                  f"{img_shape['embed_dim']}) differs from the LLM's and its attention heads "
                                  "are not stored (args.img_attention_heads)")
        image_parent = dataclasses.replace(parent, **img_shape, heads=int(img_heads))
    every = overrides.get("cross_every") or g("cross_every")
    if every is None:
        pairs = len(keys.block_indices(shapes, keys.CROSS_LAYERS["llm"]))
        shallow = min(layers, img_layers)
        every = 0 if pairs == 0 else (shallow if pairs == 1 else -(-shallow // pairs))
    return CrossConfig(parent=parent, cross_every=int(every), image_parent=image_parent,
                       image_vocab_start=int(g("image_vocab_start", -1)),
                       image_vocab_end=int(g("image_vocab_end", -1)))


def arch_of(cfg: ModelConfig) -> str:
    return ARCH_CROSS if isinstance(cfg, CrossConfig) else cfg.arch

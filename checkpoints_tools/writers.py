"""Streaming checkpoint writers: metaseq ``.pt`` (MP parts, optional FSDP shards) and safetensors.

Tensors arrive one at a time (consolidated, fp32 or any dtype) and go straight to disk: the torch
zip format is written record by record through torch's own ``PyTorchFileWriter`` with the
pickle (``data.pkl``) last, so a 26B model is never held in memory. Every file is
hashed while it is written (sha256 on a helper thread, in parallel with the write itself).
``OutputDir.add_async`` casts and splits a tensor on the caller's thread and writes each MP
rank's piece on that rank's writer thread, so the files of M ranks fill in parallel while the
caller produces the next tensor; strided pieces are packed into reused buffers (``workspace``).
Files start with the neutral ``optimizer_history`` / ``extra_state`` entries that fairseq's and
metaseq's checkpoint upgraders require. ``OutputDir`` makes the whole output atomic: everything goes into a
temp dir next to the target (named after the writing process, so a later run can remove it if
that process died), files are fsynced, ``manifest.json`` is written last, then one rename (or,
replacing an earlier output, one atomic swap); on any error or interrupt the temp dir is removed
and no output appears. A full disk is reported as the first failure, naming the output file.
Layouts follow ``docs/CHECKPOINTS.md``: ``{name}.pt`` (consolidated), ``{name}-model_part-{r}.pt``
(MP), ``-shard{j}`` (FSDP, fairscale's ``shard_metadata``: flat parameters per unit, padding on the
last shards; ``-model_part-0`` too at MP=1 once the layout is for several processes, as metaseq names
them), so metaseq's ``--restore-file OUT/{name}.pt`` finds the parts.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno as errno_mod
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import socket
import struct
import sys
import tempfile
import threading
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch.serialization import _get_storage_alignment

from checkpoints_tools import layout
from checkpoints_tools.readers import ST_DTYPE_NAMES, is_version_key
from checkpoints_tools.workspace import Workspace
from jam_metaseq.errors import JamError
from jam_metaseq.models import keys
from jam_metaseq.models.config import CrossConfig, ModelConfig

TIED = ("decoder.embed_tokens.weight", "decoder.output_projection.weight")
"""(embedding, output projection): tied in every model here. A safetensors output of tied
sources stores the embedding once and records ``__metadata__[TIED[1]] = TIED[0]``: the
``safetensors`` library's own convention for a tensor it dropped as a duplicate
(``safetensors.torch.save_model`` writes it, ``load_model`` accepts the file)."""


class OutputError(JamError, ValueError):
    """The output cannot be written (exists, no space, bad target layout)."""


# ---- hashed sequential file ---------------------------------------------------------------------


_HASH_THREAD = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="jam-ckpt-out-hash")
_PARALLEL_HASH_BYTES = 1 << 20
_WRITE_CHUNK = 1 << 20
"""Bytes per ``write()`` call. One ``write()`` of a whole 100+ MiB tensor spends several times
more kernel time copying into the page cache than the same bytes in 1 MiB calls (measured on
ext4: 2 GiB in 128 MiB calls 1.3-3.9 s of system time, in 1 MiB calls 0.5 s; 0.5-0.9 vs 1.9
GB/s with the hash running beside it)."""


WRITE_BEHIND = 64 << 20
"""Write-behind window (bytes) of an output file: each window is handed to the disk once the next
one is written and dropped from the page cache after it is on disk, so a 50 GB output keeps at
most ~2 windows per file dirty, never evicts the parents' pages, and its final fsync finds little
left to do. It also recycles page-cache pages instead of touching fresh ones: on this VM
writing 4 GiB went from 0.86 to 2.1-2.7 GB/s and from 4.1 to 1.2-1.6 s of system time
(``sync_file_range`` + ``POSIX_FADV_DONTNEED``; Linux only, elsewhere plain buffered writes).
0 disables it."""


def _load_sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


_SYNC_FILE_RANGE = _load_sync_file_range()
_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4


class WriteBehind:
    """The ``WRITE_BEHIND`` window of one file opened for writing: call ``wrote(total)`` after
    each write with the bytes written so far."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.window = WRITE_BEHIND if _SYNC_FILE_RANGE is not None else 0
        self.flushed = 0  # bytes [0, flushed) are on disk and out of the page cache

    def wrote(self, total: int) -> None:
        """Once two windows past the last flushed byte are written: start the second one's
        writeback, wait for the first's and drop it from the page cache."""
        w = self.window
        if not w or total - self.flushed < 2 * w:
            return
        self.f.flush()
        fd, start = self.f.fileno(), self.flushed
        if _SYNC_FILE_RANGE(fd, start + w, w, _SFR_WRITE) != 0 or \
                _SYNC_FILE_RANGE(fd, start, w, _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER) != 0:
            self.window = 0  # not supported here (e.g. some network filesystems): plain writes
            return
        os.posix_fadvise(fd, start, w, os.POSIX_FADV_DONTNEED)
        self.flushed = start + w


class OutputWriteError(OutputError):
    """Writing an output file failed (disk full, file too large, I/O error); ``errno`` as the
    OS reported it. The message names the output file."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def write_error(path: Path, e: OSError) -> OutputWriteError:
    """``e`` (from writing ``path``) as an ``OutputWriteError`` naming the file and the OS's cause."""
    cause = f"{e.strerror} (errno {e.errno}{', ' + errno_mod.errorcode.get(e.errno, '') if e.errno else ''})" \
        if e.strerror else str(e)
    return OutputWriteError(f"{path}: cannot write: {cause}", e.errno)


def _load_crc32() -> Callable[..., int]:
    """The fastest available CRC-32 (zip's polynomial): ISA-L's (``isal``: carry-less multiply,
    ~3x zlib's on this project's CPU box), else zlib-ng's, else Python's zlib."""
    try:
        from isal.isal_zlib import crc32 as fast
        return fast
    except ImportError:
        pass
    try:
        from zlib_ng.zlib_ng import crc32 as fast
        return fast
    except ImportError:
        import zlib
        return zlib.crc32


crc32 = _load_crc32()

_LOCAL, _DESCRIPTOR, _CENTRAL = b"PK\x03\x04", b"PK\x07\x08", b"PK\x01\x02"
_SERIALIZATION_ID = b".data/serialization_id"
_U64 = (1 << 64) - 1


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on a 64-bit size_t (how torch combines record CRCs)."""
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & _U64) + (seed >> 2)) & _U64)) & _U64


class ZipCrcs:
    """The sink of torch's zip writer run with ``compute_crc32=False``: it puts the CRC-32s where
    ``compute_crc32=True`` would have, so the file is byte for byte the same, but each CRC is
    computed beside the write and its sha256 (on a helper thread, by the fastest ``crc32`` at
    hand) instead of serially inside torch before the write.

    torch's records are stored with a data descriptor: local header (CRC and sizes 0), name,
    extra field (alignment padding), data, then a 16- or 24-byte descriptor holding the CRC (an
    empty record has none); the central directory at the end repeats each CRC; the record
    ``.data/serialization_id`` ends in 20 digits combining the non-empty records' CRCs
    (``_hash_combine``). ``begin_record(n)``: the caller's next record holds ``n`` bytes; the
    small records torch adds itself are recognised by their descriptor. Any other layout stops
    the write with an ``OutputError`` (kept in the file's ``error``), never a wrong file."""

    def __init__(self, out: "_HashedFile") -> None:
        self.out = out
        self.state = "between"  # between | name | data | descriptor | small
        self.need = 0
        self.name = bytearray()
        self.name_len = 0
        self.crc = 0
        self.size = 0
        self.small = bytearray()
        self.expected: int | None = None
        self.records: list[tuple[bytes, int, int]] = []  # (name, crc, size) in file order
        self.tail = bytearray()  # central directory and end records, written by ``finish``

    def begin_record(self, nbytes: int) -> None:
        self.expected = nbytes

    def _bad(self, what: str) -> None:
        raise OutputError(f"{self.out.shown}: unexpected zip layout from torch's writer ({what})")

    def write(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        if self.out.discarding:
            return mv.nbytes
        try:
            self._feed(mv)
        except BaseException as e:  # noqa: B036 - never raise into the zip writer (see _HashedFile)
            self.out._fail(e)
        return mv.nbytes

    def flush(self) -> None:
        self.out.flush()

    def _end_record(self, crc: int, size: int) -> None:
        self.records.append((bytes(self.name), crc, size))
        self.state, self.expected = "between", None

    def _descriptor(self, mv: memoryview, crc: int, size: int) -> bytes:
        if mv.nbytes not in (16, 24) or bytes(mv[:4]) != _DESCRIPTOR:
            self._bad(f"no data descriptor after {bytes(self.name)!r}")
        d = bytearray(mv)
        stored = int.from_bytes(d[12:16] if mv.nbytes == 16 else d[16:24], "little")
        if stored != size:
            self._bad(f"the descriptor of {bytes(self.name)!r} says {stored} bytes, {size} were written")
        d[4:8] = struct.pack("<I", crc & 0xFFFFFFFF)
        self._end_record(crc, size)
        return bytes(d)

    def _feed(self, mv: memoryview) -> None:
        while mv.nbytes:
            if self.state == "between":
                head = bytes(mv[:4])
                if head == _CENTRAL or self.tail:
                    self.tail += mv
                    return
                if head != _LOCAL or mv.nbytes < 30:
                    self._bad("expected a local file header")
                name_len, extra_len = struct.unpack("<HH", mv[26:30])
                self.out.write(mv[:30])
                self.name, self.name_len, self.need, self.state = bytearray(), name_len, name_len + extra_len, "name"
                mv = mv[30:]
            elif self.state == "name":
                n = min(self.need, mv.nbytes)
                self.name += mv[:max(0, min(n, self.name_len - len(self.name)))]
                self.out.write(mv[:n])
                self.need -= n
                mv = mv[n:]
                if self.need == 0:
                    if self.expected == 0:
                        self._end_record(0, 0)  # empty: no data, no descriptor
                    elif self.expected is not None:
                        self.state, self.need, self.crc, self.size = "data", self.expected, 0, 0
                    else:
                        self.state, self.small = "small", bytearray()
            elif self.state == "data":
                n = min(self.need, mv.nbytes)
                part = mv[:n]
                if n >= _PARALLEL_HASH_BYTES:
                    fut = _HASH_THREAD.submit(crc32, part, self.crc)
                    try:
                        self.out.write(part)
                    finally:
                        self.crc = fut.result()
                else:
                    self.crc = crc32(part, self.crc)
                    self.out.write(part)
                self.need -= n
                self.size += n
                mv = mv[n:]
                if self.need == 0:
                    self.state = "descriptor"
            elif self.state == "descriptor":
                self.out.write(self._descriptor(mv, self.crc, self.size))
                return
            else:  # "small": a record torch adds; its descriptor tells where its data ends
                ends = (mv.nbytes in (16, 24) and bytes(mv[:4]) == _DESCRIPTOR
                        and int.from_bytes(mv[12:16] if mv.nbytes == 16 else mv[16:24], "little") == len(self.small))
                if not ends and not self.small and bytes(mv[:4]) in (_LOCAL, _CENTRAL):
                    self._end_record(0, 0)  # it was empty
                    continue
                if not ends:
                    self.small += mv
                    return
                data = self.small
                if bytes(self.name).endswith(_SERIALIZATION_ID):
                    data = self._serialization_id(data)
                crc = crc32(data)
                self.out.write(data)
                self.out.write(self._descriptor(mv, crc, len(data)))
                return

    def _serialization_id(self, data: bytearray) -> bytearray:
        """torch's id: 20 digits of combined name hashes (kept), 20 of combined CRCs (ours)."""
        if len(data) != 40 or not bytes(data).isdigit():
            self._bad(f"serialization id {bytes(data)!r}")
        combined = 0
        for _, crc, size in self.records:
            if size:
                combined = _hash_combine(combined, crc)
        return bytearray(bytes(data[:20]) + f"{combined:020d}".encode())

    def finish(self) -> None:
        """Write the central directory with each entry's CRC (one entry per record, in order)."""
        if self.out.discarding:
            return
        try:
            t, pos, i = self.tail, 0, 0
            while t[pos:pos + 4] == _CENTRAL:
                name_len, extra_len, comment_len = struct.unpack("<HHH", t[pos + 28:pos + 34])
                name = bytes(t[pos + 46:pos + 46 + name_len])
                if i >= len(self.records) or self.records[i][0] != name:
                    self._bad(f"central directory entry {name!r} is not record {i}")
                t[pos + 16:pos + 20] = struct.pack("<I", self.records[i][1] & 0xFFFFFFFF)
                pos += 46 + name_len + extra_len + comment_len
                i += 1
            if i != len(self.records) or not t:
                self._bad(f"{len(self.records)} records, {i} central directory entries")
            self.out.write(memoryview(t))
            self.tail = bytearray()
        except BaseException as e:  # noqa: B036 - reported by the file's check()
            self.out._fail(e)


class _HashedFile:
    """A write-only file that sha256-hashes what goes through it (the zip writer only appends).
    Big writes are hashed on a helper thread while the main thread writes the same bytes (both
    release the GIL); ``write`` returns once both are done, so callers may reuse the buffer.

    ``write`` never raises: torch's zip writer calls it from C++, and an exception there leaves
    the writer's position behind the file's, so its destructor (which writes the end records)
    aborts the whole process. The first failure (a full disk, or an interrupt that lands in
    here) is kept in ``error``, later bytes are discarded, and the caller raises it with
    ``check()`` once the zip writer has returned. ``shown``: the path errors name (the final
    output file, not its temp location)."""

    def __init__(self, path: Path, *, shown: Path | None = None) -> None:
        self.path = path
        self.shown = shown or path
        self.f = open(path, "wb")
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self.discarding = False
        self.error: BaseException | None = None
        self.behind = WriteBehind(self.f)

    def write(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        if self.discarding:  # failed or aborted: the zip writer's last records go nowhere
            return mv.nbytes
        try:
            self.nbytes += mv.nbytes
            if mv.nbytes < _PARALLEL_HASH_BYTES:
                self.sha.update(mv)
                self.f.write(mv)
                self.behind.wrote(self.nbytes)
                return mv.nbytes
            fut = _HASH_THREAD.submit(self.sha.update, mv)
            try:
                n = 0
                for i in range(0, mv.nbytes, _WRITE_CHUNK):
                    n += self.f.write(mv[i:i + _WRITE_CHUNK])
                    self.behind.wrote(self.nbytes - mv.nbytes + n)
            finally:
                fut.result()
        except BaseException as e:  # noqa: B036 - kept for check(); see the class docstring
            self._fail(e)
        return mv.nbytes

    def _fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e
        self.discarding = True

    def check(self) -> None:
        """Raise the first failure of a write (an ``OSError`` as ``OutputWriteError``)."""
        e = self.error
        if e is None:
            return
        if isinstance(e, OSError):
            raise write_error(self.shown, e) from e
        raise e

    def flush(self) -> None:
        if not self.discarding:
            try:
                self.f.flush()
            except OSError as e:
                self._fail(e)

    def close(self) -> tuple[str, int]:
        """Flush, fsync and close (a full disk often shows only here); raise the first failure."""
        if not self.discarding:
            try:
                self.f.flush()
                os.fsync(self.f.fileno())
            except OSError as e:
                self._fail(e)
        try:
            self.f.close()
        except OSError as e:
            self._fail(e)
        self.check()
        return self.sha.hexdigest(), self.nbytes

    def discard(self) -> None:
        """Close without flushing to disk (the output is being removed); later writes go nowhere."""
        self.discarding = True
        try:
            self.f.close()
        except BaseException:  # noqa: B036 - unflushed bytes of a removed file
            pass


# ---- torch zip format, streamed ----------------------------------------------------------------


class _StorageStub:
    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorStub:
    """Pickles exactly like a contiguous CPU tensor whose storage was already written."""

    def __init__(self, storage: _StorageStub, shape: Sequence[int]) -> None:
        self.storage, self.shape = storage, tuple(int(s) for s in shape)

    def __reduce_ex__(self, protocol: int) -> Any:
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= max(d, 1)
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, tuple(reversed(stride)), False, collections.OrderedDict()))


_STORAGE_TYPES = torch.storage._dtype_to_storage_type_map()


class _StubPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageStub):
            return ("storage", getattr(torch, _STORAGE_TYPES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


class TorchStreamWriter:
    """One ``.pt`` file: ``add`` writes a tensor's bytes now; ``finish`` pickles the object tree."""

    def __init__(self, path: Path, *, shown: Path | None = None) -> None:
        self.path = path
        self._file = _HashedFile(path, shown=shown)
        self._crcs = ZipCrcs(self._file)
        self._zip = torch._C.PyTorchFileWriter(self._crcs, False, _get_storage_alignment())
        self._n = 0

    def add(self, tensor: torch.Tensor) -> _TensorStub:
        t = tensor.detach().contiguous()
        if t.device.type != "cpu":
            t = t.cpu()
        key = str(self._n)
        self._n += 1
        storage = t.untyped_storage()
        nbytes = t.numel() * t.element_size()
        if t.storage_offset() != 0 or storage.nbytes() != nbytes:
            # A contiguous view (an MP chunk): write just its bytes, a storage slice (no copy).
            start = t.storage_offset() * t.element_size()
            storage = storage[start:start + nbytes]
        self._crcs.begin_record(nbytes)
        self._zip.write_record(f"data/{key}", storage, nbytes)
        self._file.check()
        return _TensorStub(_StorageStub(key, t.dtype, t.numel()), t.shape)

    def finish(self, obj: Any) -> tuple[str, int]:
        buf = io.BytesIO()
        _StubPickler(buf, protocol=2).dump(obj)
        data = buf.getvalue()
        align = str(_get_storage_alignment())
        for name, payload in (("data.pkl", data), (".format_version", "1"), (".storage_alignment", align),
                              ("byteorder", sys.byteorder)):
            self._crcs.begin_record(len(payload))
            self._zip.write_record(name, payload, len(payload))
        self._zip.write_end_of_file()
        del self._zip
        self._crcs.finish()
        self._file.check()
        return self._file.close()

    def abort(self) -> None:
        # The zip writer writes its end records when it is destroyed: let it do so now, into the
        # discarded file (a write to a closed file from the destructor would abort the process).
        self._file.discard()
        self.__dict__.pop("_zip", None)


# ---- safetensors, streamed ---------------------------------------------------------------------


class SafetensorsStreamWriter:
    """A safetensors file whose header is fixed up front from the planned shapes/dtypes."""

    def __init__(self, path: Path, plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: Mapping[str, str] | None = None, *, shown: Path | None = None) -> None:
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        off = 0
        self._order: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []
        for name, shape, dt in plan:
            n = dt.itemsize
            for s in shape:
                n *= s
            header[name] = {"dtype": ST_DTYPE_NAMES[dt], "shape": list(shape), "data_offsets": [off, off + n]}
            self._order.append((name, tuple(shape), dt, n))
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((8 - len(raw) % 8) % 8)  # keep tensor data 8-byte aligned
        self.path = path
        self._file = _HashedFile(path, shown=shown)
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._file.check()
        self._i = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        want, shape, dt, n = self._order[self._i]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dt:
            raise OutputError(f"{self.path}: expected {want} {shape} {dt}, got {name} "
                              f"{tuple(tensor.shape)} {tensor.dtype}")
        t = tensor.detach().contiguous()
        if n:
            self._file.write(t.view(-1).view(torch.uint8).numpy().data if t.dtype != torch.bool
                             else t.to(torch.uint8).numpy().data)
            self._file.check()
        self._i += 1

    def finish(self) -> tuple[str, int]:
        if self._i != len(self._order):
            raise OutputError(f"{self.path}: only {self._i} of {len(self._order)} tensors written")
        return self._file.close()

    def abort(self) -> None:
        self._file.discard()


# ---- model args that the hosts understand ------------------------------------------------------


def model_namespace(cfg: ModelConfig, *, model_parallel_size: int = 1) -> Namespace:
    """``cfg["model"]`` for metaseq/fairseq: the arch and the host flags of ``cfg``
    (``jam_metaseq.hosts.args.args_from_config``, the one config -> flags map), plus
    ``jam_config``, which the hosts prefer. A plain parent is ``transformer_lm`` with no JAM family."""
    from jam_metaseq.hosts import args as host_args

    arch = host_args.host_arch(cfg)
    flags = host_args.args_from_config(cfg)
    flags.pop("jam_family")
    cross = {k: flags.pop(k) for k in host_args.CROSS_FLAGS if k in flags}
    return Namespace(_name=arch, arch=arch, **flags, model_parallel_size=model_parallel_size,
                     jam_family=arch if arch in host_args.FAMILIES else None, jam_config=cfg.to_dict(), **cross)


START_CRITERION = "CM3Criterion"
"""``criterion_name`` of the neutral history entry: the class name of the fairseq host's ``cm3``
criterion (``jam_metaseq.hosts.fairseq.CM3Criterion``). The trainers compare it only when they
restore an optimizer state, which a fresh starting checkpoint does not have."""


def start_optimizer_history() -> list[dict[str, Any]]:
    """One neutral ``optimizer_history`` entry: fairseq's and metaseq's ``_upgrade_state_dict``
    index ``optimizer_history[-1]`` unconditionally (``[]`` crashes them), and their trainers read
    ``num_updates`` from it (0: the run starts at update 0)."""
    return [{"criterion_name": START_CRITERION, "optimizer_name": "none",
             "lr_scheduler_state": {}, "num_updates": 0}]


def start_extra_state() -> dict[str, Any]:
    """The minimal ``extra_state`` for ``--restore-file`` without ``--reset-dataloader``: the
    upgraders look up ``extra_state["train_iterator"]`` (``None`` crashes them) and the trainer
    starts its data iterator at that epoch (1, iteration 0; ``version`` 2 = meters start fresh)."""
    return {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0, "shuffle": True, "version": 2},
            "val_loss": None}


def checkpoint_meta(cfg: ModelConfig, *, mp: int, fsdp: int, vocab: Mapping[str, Any] | None) -> dict[str, Any]:
    """Non-model keys of every written ``.pt``: what metaseq/fairseq restore from, plus our config.
    ``cfg`` also holds the task / criterion / optimization groups their evaluation CLIs rebuild
    the ``cm3_multimodal`` task and ``cm3`` criterion from (``hosts.args.saved_cfg_groups``)."""
    from jam_metaseq.hosts.args import saved_cfg_groups

    return {
        "cfg": {
            "model": model_namespace(cfg, model_parallel_size=mp),
            "common": {"model_parallel_size": mp},
            "distributed_training": {"distributed_world_size": mp * max(fsdp, 1),
                                     "use_sharded_state": fsdp > 0},
            **saved_cfg_groups(),
        },
        "criterion": None,
        "optimizer_history": start_optimizer_history(),
        "task_state": {},
        "extra_state": start_extra_state(),
        "last_optimizer_state": None,
        "jam_config": cfg.to_dict(),
        "jam_vocab": dict(vocab) if vocab else None,
    }


# ---- FSDP units --------------------------------------------------------------------------------

def fsdp_unit(name: str) -> tuple[str, str]:
    """(fsdp_path, name inside the unit): one unit per layer / cross block (a block of the key
    schema, ``jam_metaseq.models.keys``), the rest in the root."""
    block = keys.block_of(name)
    if block is None:
        return "", name
    return name[: -len(block[2]) - 1], block[2]


@dataclass
class _Unit:
    path: str
    names: list[str]  # local names, in order
    pending: dict[str, torch.Tensor] = field(default_factory=dict)


class _FsdpRank:
    """FSDP shard files of one MP rank: collects each unit's tensors, then flattens and chunks it."""

    def __init__(self, files: list[TorchStreamWriter], units: dict[str, _Unit], shared: list[tuple[str, str]],
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

    def _flush(self, unit: _Unit) -> None:
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


# ---- the output directory ----------------------------------------------------------------------


@dataclass
class OutputSpec:
    """Where and how to write one model."""

    out_dir: Path
    """Final directory (must not exist unless ``overwrite``)."""
    format: str = "metaseq"
    """``metaseq`` (.pt files) or ``safetensors`` (one consolidated file)."""
    mp: int = 1
    """Target model-parallel size."""
    fsdp: int = 0
    """FSDP shards per MP rank (0 = plain, unflattened state dicts)."""
    dtype: torch.dtype | None = None
    """Output dtype of floating tensors (None = as produced)."""
    name: str = "checkpoint"
    """File stem: ``{name}.pt`` / ``{name}-model_part-{r}[-shard{j}].pt`` / ``{name}.safetensors``."""
    overwrite: bool = False
    """Replace an existing jam-ckpt output directory (one with manifest.json), atomically."""
    overwrite_any_dir: bool = False
    """Replace an existing directory even if it is not a jam-ckpt output (implies ``overwrite``)."""

    def file_names(self) -> list[list[str]]:
        """[rank][shard] -> file name: metaseq's names for a run of ``mp`` x ``fsdp`` processes,
        which carry ``-model_part-{r}`` whenever that is more than one process (metaseq's
        distributed start adds it, at model-parallel size 1 too) and ``-shard{j}`` with FSDP."""
        if self.format == "safetensors":
            return [[f"{self.name}.safetensors"]]
        out = []
        for r in range(self.mp):
            part = f"-model_part-{r}" if self.mp * max(self.fsdp, 1) > 1 else ""
            if self.fsdp:
                out.append([f"{self.name}{part}-shard{j}.pt" for j in range(self.fsdp)])
            else:
                out.append([f"{self.name}{part}.pt"])
        return out


def estimate_output_bytes(shapes: Mapping[str, Sequence[int]], *, spec: OutputSpec,
                          dtypes: Mapping[str, torch.dtype]) -> int:
    total = 0
    for name, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        dt = dtypes[name]
        if name == TIED[1] and spec.format != "safetensors":
            continue  # aliased to the embedding in .pt files
        copies = spec.mp if layout.rule_for(name) == "replicated" else 1
        total += n * dt.itemsize * copies
    return total


def check_free_space(out_dir: Path, need: int) -> None:
    parent = out_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if need + (64 << 20) > free:
        raise OutputError(f"{parent}: not enough free disk for {out_dir.name}: need ~{need / 2**30:.2f} GiB, "
                          f"{free / 2**30:.2f} GiB free")


# ---- where an output may go; temp dirs; replacing an output ------------------------------------


def _proc_start_time(pid: int) -> int:
    """The start time of process ``pid`` (clock ticks since boot; Linux), 0 where unknown. With
    the pid it identifies a process: a recycled pid has another start time."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


_HOST = socket.gethostname().replace("/", "_") or "localhost"
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<start>\d+)-[^@/]+@(?P<host>[^/]+)$")


def _owned_name_parts(kind: str, out_name: str) -> tuple[str, str]:
    """(prefix, suffix) of this process's ``kind`` (tmp|old) directory names next to ``out_name``:
    ``.{out_name}.{kind}-{pid}-{start time}-{random}@{host}``, so another run can tell whether
    the owner is still alive (``sweep_stale``)."""
    pid = os.getpid()
    return f".{out_name}.{kind}-{pid}-{_proc_start_time(pid)}-", f"@{_HOST}"


def _owner_alive(pid: int, start: int, host: str) -> bool | None:
    """True/False for a process of this host; None where it cannot be told (another host)."""
    if host != _HOST:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return None
    now = _proc_start_time(pid)
    return not (start and now and now != start)


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it races threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_jam_ckpt_output(path: Path) -> bool:
    """``path`` is a directory holding a jam-ckpt ``manifest.json``."""
    try:
        m = json.loads((path / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(m, dict) and m.get("created_by") == "jam-ckpt"


def _remove_tree(path: Path) -> None:
    """``rmtree`` that finishes even if an interrupt lands in it (then re-raised)."""
    pending: BaseException | None = None
    for _ in range(3):
        try:
            shutil.rmtree(path, ignore_errors=True)
            break
        except BaseException as e:  # noqa: B036 - a Ctrl-C must not leave half a temp dir
            pending = pending or e
    if pending is not None:
        raise pending


def sweep_stale(out: Path) -> None:
    """Clean up after runs that died while writing ``out`` (killed, SIGKILL, power loss): their
    temp dirs ``.{out}.tmp-*`` are removed; a ``.{out}.old-*`` (the previous output, moved aside
    by a replacement that was cut off between its two renames) is put back as ``out`` if
    ``out`` is missing, else removed. Only directories whose recorded owner (pid, start time,
    host) is this host's and no longer running are touched; each action is said on stderr."""
    parent = out.parent
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for e in entries:
        if not e.name.startswith(f".{out.name}.") or not e.is_dir(follow_symlinks=False):
            continue
        m = _TEMP_RE.match(e.name)
        if m is None or m["name"] != out.name:
            if e.name.startswith(f".{out.name}.tmp-"):
                _note(f"{out}: left {e.name}: no owner recorded (written by an older jam-ckpt); remove it "
                      "by hand if nothing is writing this output")
            continue
        pid, start, host = int(m["pid"]), int(m["start"]), m["host"]
        alive = _owner_alive(pid, start, host)
        if alive is None:
            _note(f"{out}: left {e.name}: written by host {host}, which cannot be checked from here")
            continue
        if alive:
            continue  # a live writer's (perhaps this process's)
        path = Path(e.path)
        if m["kind"] == "old" and not os.path.lexists(out):
            os.rename(path, out)
            _fsync_dir(parent)
            _note(f"{out}: restored the previous output from {e.name} (process {pid} on {host} was replacing "
                  "it and died between its two renames)")
            continue
        _remove_tree(path)
        _note(f"{out}: removed {e.name}, left by process {pid} on {host}, which is no longer running")


def _protected_dirs() -> list[tuple[Path, str]]:
    """Directories an output must never be or replace: /, $HOME and its parents, the working
    directory and its parents."""
    out = [(Path("/"), "the filesystem root")]
    home = os.environ.get("HOME")
    if home:
        h = Path(home).resolve()
        out += [(h, "your home directory ($HOME)")] + [(p, "a parent of your home directory") for p in h.parents]
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        cwd = None
    if cwd is not None:
        out += [(cwd, "the working directory")] + [(p, "a parent of the working directory") for p in cwd.parents]
    return out


def check_output_target(out: Path, *, overwrite: bool, overwrite_any_dir: bool = False,
                        inputs: Sequence[Path] = ()) -> None:
    """Refuse an output directory that would lose data: ``/``, ``$HOME``, the working directory
    or a parent of any of them; one that is or contains an input; an existing path unless
    ``overwrite``, and then only a jam-ckpt output (``manifest.json``) unless
    ``overwrite_any_dir`` (a symlink or a file never)."""
    resolved = out.resolve()
    lexical = Path(os.path.abspath(out))
    for p, what in _protected_dirs():
        if resolved == p or lexical == p:
            raise OutputError(f"{out}: refusing to use {what} as the output directory (an output replaces "
                              "its directory as a whole); name a new directory inside it")
    for src in inputs:
        for mine, theirs in ((resolved, Path(src).resolve()), (lexical, Path(os.path.abspath(src)))):
            if theirs == mine or mine in theirs.parents:
                raise OutputError(f"{out}: is or contains the input {src}; write the output somewhere else")
    if not os.path.lexists(out):
        return
    if not (overwrite or overwrite_any_dir):
        raise OutputError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.is_symlink():
        raise OutputError(f"{out}: is a symbolic link; name the directory itself to replace it")
    if not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory; not replaced")
    if not overwrite_any_dir and not is_jam_ckpt_output(out):
        raise OutputError(f"{out}: exists and is not a jam-ckpt output (no manifest.json); --overwrite replaces "
                          "only those. Remove it yourself, or pass --overwrite-any-dir to replace it with "
                          "everything in it")


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _load_renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD = -100


def rename_special(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``: True when done, False where the system or filesystem
    does not support it (the caller falls back to plain renames); other errors raise."""
    if _RENAMEAT2 is None:
        return False
    import ctypes

    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno_mod.ENOSYS, errno_mod.EINVAL, errno_mod.ENOTSUP, errno_mod.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))  # EEXIST -> FileExistsError


def install_output(tmp: Path, out: Path, *, replace: bool) -> None:
    """Put the complete directory ``tmp`` in place as ``out`` (same filesystem), so that at
    every instant ``out`` is either the old output or the new one, both complete. New: one
    rename that never replaces (a directory that appeared meanwhile is not clobbered).
    Replacing: the two directories are swapped in one step (Linux ``RENAME_EXCHANGE``), then
    the old one, now at ``tmp``, is removed; where that is unsupported the old one is renamed
    aside (``.{out}.old-*``, marked with this process like the temp dir), the new one renamed
    in, then the old one removed: a death between the two renames leaves the old output
    complete at the aside name, and the next run puts it back (``sweep_stale``)."""
    parent = out.parent
    if not replace:
        try:
            done = rename_special(tmp, out, _RENAME_NOREPLACE)
        except FileExistsError:
            done = False
        if not done:
            if os.path.lexists(out):
                raise OutputError(f"{out}: appeared while writing; not replaced")
            os.rename(tmp, out)
        _fsync_dir(parent)
        return
    if rename_special(tmp, out, _RENAME_EXCHANGE):
        _fsync_dir(parent)
        _remove_tree(tmp)  # the old output
        return
    prefix, suffix = _owned_name_parts("old", out.name)
    aside = parent / f"{prefix}{os.urandom(4).hex()}{suffix}"
    os.rename(out, aside)
    try:
        os.rename(tmp, out)
    except BaseException:  # noqa: B036 - whatever stops us, the old output goes back
        os.rename(aside, out)
        raise
    _fsync_dir(parent)
    _remove_tree(aside)


class OutputDir:
    """Write one model atomically: ``open``, ``add`` tensors in plan order, then ``commit`` (or
    ``abort``). Creating one checks the target (``check_output_target``; ``inputs``: the files
    read, which the output must not be or contain) and clears what dead runs left next to it
    (``sweep_stale``); ``open`` makes the temp dir. The first failure of any write, on any
    writer thread, is the one reported (``first_error``), and writes queued after it are
    skipped."""

    def __init__(self, spec: OutputSpec, *, cfg: ModelConfig, shapes: Mapping[str, Sequence[int]],
                 vocab: Mapping[str, Any] | None = None, check_space: bool = True,
                 inputs: Sequence[Path] = ()) -> None:
        if spec.format not in ("metaseq", "safetensors", "hf_opt"):
            raise OutputError(f"unknown output format {spec.format!r}")
        if spec.format in ("safetensors", "hf_opt") and (spec.mp != 1 or spec.fsdp):
            raise OutputError(f"{spec.format} output is consolidated: use --mp 1 without --fsdp")
        if spec.mp < 1 or spec.fsdp < 0:
            raise OutputError(f"bad layout mp={spec.mp} fsdp={spec.fsdp}")
        out = Path(spec.out_dir)
        if out.name in ("", ".", ".."):
            out = Path(os.path.abspath(out))
        sweep_stale(Path(os.path.abspath(out)))
        check_output_target(out, overwrite=spec.overwrite, overwrite_any_dir=spec.overwrite_any_dir, inputs=inputs)
        if spec.mp > 1:
            branches = ([("", cfg.llm)] if cfg.symmetric else [(" (LLM branch)", cfg.llm), (" (image branch)", cfg.img)]) \
                if isinstance(cfg, CrossConfig) else [("", cfg)]
            for label, parent in branches:
                layout.check_mp(heads=parent.heads, vocab_size=parent.vocab_size, ffn_dim=parent.ffn_dim,
                                embed_dim=parent.embed_dim, parts=spec.mp, what=f"target {out}{label}")
        self.spec, self.cfg, self.vocab = spec, cfg, vocab
        self.shapes = collections.OrderedDict((k, tuple(int(s) for s in v)) for k, v in shapes.items())
        self.out = out
        self.inputs = list(inputs)
        self.tmp: Path | None = None  # made by open()
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()
        self._done: set[str] = set()
        self._tied_sha: list[str | None] = [None] * spec.mp
        self._tied_stub: list[Any] = [None] * spec.mp
        self.tensor_meta: dict[str, dict[str, Any]] = {}
        names = spec.file_names()
        self._st: SafetensorsStreamWriter | None = None
        self._pt: list[list[TorchStreamWriter]] = []
        self._fsdp: list[_FsdpRank] = []
        self._plain: list[dict[str, Any]] = []
        self._dtypes: dict[str, torch.dtype] = {}
        self._check_space = check_space
        self._st_names = names
        self._ws = Workspace()  # cast buffers (one per slot), reused tensor after tensor
        self._rank_ws = [Workspace() for _ in range(spec.mp)]  # packed MP pieces, per writer thread
        self._expect_tied = False

    def _out_dtype(self, name: str, produced: torch.dtype) -> torch.dtype:
        if self.spec.dtype is not None and produced.is_floating_point and not is_version_key(name):
            return self.spec.dtype
        if is_version_key(name) and self.spec.dtype is not None:
            return self.spec.dtype  # metaseq casts buffers with the model (.half())
        return produced

    def open(self, dtypes: Mapping[str, torch.dtype]) -> None:
        """Make the temp dir and create the files; ``dtypes`` = the dtype each tensor will be
        produced in."""
        self._dtypes = {n: self._out_dtype(n, dtypes[n]) for n in self.shapes}
        parent = Path(os.path.abspath(self.out)).parent
        parent.mkdir(parents=True, exist_ok=True)
        if self._check_space:
            check_free_space(self.out, estimate_output_bytes(self.shapes, spec=self.spec, dtypes=self._dtypes))
        # Next to the target (same filesystem: the final rename is atomic), named after this
        # process so that a later run can tell whether it is still alive (sweep_stale).
        prefix, suffix = _owned_name_parts("tmp", self.out.name)
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
        self._open_files()

    def _shown(self, name: str) -> Path:
        """The path errors name for an output file: where it was going to be."""
        return self.out / name

    def _open_files(self) -> None:
        if self.spec.format == "hf_opt":
            from checkpoints_tools.convert_hf import hf_config, hf_shapes
            self._hf_config = hf_config(self.cfg, dtype=self.spec.dtype or next(iter(self._dtypes.values())))
            plan = [(n, s, self._dtypes["decoder.embed_tokens.weight"])
                    for n, s in hf_shapes(self.shapes, cfg=self.cfg).items()]
            self._st = SafetensorsStreamWriter(self.tmp / "model.safetensors", plan, {"format": "pt"},
                                               shown=self._shown("model.safetensors"))
            return
        if self.spec.format == "safetensors":
            md = {"format": "pt", "jam_config": json.dumps(self.cfg.to_dict())}
            if self.vocab:
                md["jam_vocab"] = json.dumps(dict(self.vocab))
            if self._expect_tied:
                md[TIED[1]] = TIED[0]
            plan = [(n, s, self._dtypes[n]) for n, s in self.shapes.items()
                    if not (self._expect_tied and n == TIED[1])]
            self._st = SafetensorsStreamWriter(self.tmp / self._st_names[0][0], plan, md,
                                               shown=self._shown(self._st_names[0][0]))
            return
        self._pt = [[TorchStreamWriter(self.tmp / f, shown=self._shown(f)) for f in rank] for rank in self._st_names]
        if self.spec.fsdp:
            buffers = [n for n in self.shapes if is_version_key(n)]
            shared = [TIED] if all(t in self.shapes for t in TIED) else []
            for r in range(self.spec.mp):
                units: dict[str, _Unit] = {}
                for n in self.shapes:
                    if n in buffers or (shared and n == TIED[1]):
                        continue
                    path, local = fsdp_unit(n)
                    units.setdefault(path, _Unit(path, [])).names.append(local)
                self._fsdp.append(_FsdpRank(self._pt[r], units, shared, buffers))
        else:
            self._plain = [collections.OrderedDict() for _ in range(self.spec.mp)]

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype ``name`` is written in (after ``open``): producing in it saves a cast."""
        return self._dtypes[name]

    @property
    def aliases_tied(self) -> bool:
        """The files store the output projection as the embedding itself: ``.pt`` layouts alias its
        storage (as ``torch.save`` does), safetensors stores it once and names the alias in
        ``__metadata__`` (``TIED_METADATA``); HF OPT files have no output projection (``lm_head``
        is tied by the config)."""
        return all(t in self.shapes for t in TIED) and self.shapes[TIED[0]] == self.shapes[TIED[1]]

    def expect_tied(self) -> None:
        """The caller will write the output projection with ``add_tied`` (its sources are tied):
        the embedding then need not be hashed for the comparison ``add`` makes, and a safetensors
        file stores it once. Call before ``open``."""
        if not self.aliases_tied:
            raise OutputError(f"{self.out}: this layout does not alias {TIED[1]} to {TIED[0]}")
        if self.tmp is not None:
            raise OutputError(f"{self.out}: expect_tied after open")
        self._expect_tied = True

    def add_tied(self, name: str, *, pools: Sequence[concurrent.futures.Executor] | None = None
                 ) -> list[concurrent.futures.Future]:
        """Write ``name`` (the output projection) as an alias of the embedding (per rank on
        ``pools[r]``, after that rank's embedding; None = now)."""
        if name != TIED[1] or not self._expect_tied:
            raise OutputError(f"tensor {name}: cannot be written tied (call expect_tied first; only {TIED[1]})")
        if TIED[0] not in self._done:
            raise OutputError(f"tensor {name}: tied to {TIED[0]}, which is not written yet")
        if name in self._done:
            raise OutputError(f"tensor {name} written twice")
        self._done.add(name)
        self.tensor_meta[name] = dict(self.tensor_meta[TIED[0]])
        if self.spec.fsdp or self._st is not None:  # FSDP: shared_param_info; safetensors: in the header
            return []

        def alias(r: int) -> None:
            self._plain[r][name] = self._tied_stub[r]

        return [_submit(pools[r] if pools else None, alias, r) for r in range(self.spec.mp)]

    @property
    def writer_count(self) -> int:
        """How many files can be written in parallel (one per output MP rank; 1 for safetensors)."""
        return 1 if self._st is not None or self.spec.format != "metaseq" else self.spec.mp

    def _pieces(self, name: str, t: torch.Tensor) -> list[Any]:
        """The MP pieces of ``t``: tensors (views where possible; with FSDP the pieces are kept
        until their unit is complete, ``t`` is then the caller's own copy) or, for qkv, the
        (K_r, V_r, Q_r) views to concatenate. Packing strided pieces is left to the rank's writer
        thread (``_write_rank``), into one buffer per rank."""
        M = self.spec.mp
        if M == 1 or self.spec.fsdp:
            return layout.split(name, t, M)
        if layout.rule_for(name) == "qkv":  # rank r = [K_r; V_r; Q_r]
            if t.shape[0] % (3 * M):
                raise ValueError(f"tensor {name}: {t.shape[0]} rows (3 x parts) not divisible by "
                                 f"model-parallel size {M}")
            k, v, q = torch.chunk(t, 3, dim=0)
            ks, vs, qs = (torch.chunk(x, M, dim=0) for x in (k, v, q))
            return [(ks[r], vs[r], qs[r]) for r in range(M)]
        return layout.split(name, t, M)

    def _prepare(self, name: str, tensor: torch.Tensor, slot: int | None) -> torch.Tensor:
        """Checks, bookkeeping and the cast to the written dtype (into this slot's buffer; a
        new tensor when ``slot`` is None)."""
        if name not in self.shapes:
            raise OutputError(f"unexpected tensor {name} (not in the target model)")
        if tuple(tensor.shape) != self.shapes[name]:
            raise OutputError(f"tensor {name}: produced shape {tuple(tensor.shape)}, target {self.shapes[name]}")
        if name in self._done:
            raise OutputError(f"tensor {name} written twice")
        dt = self._dtypes[name]
        if self.spec.fsdp:
            t = tensor.to(dt, copy=True)  # held until its FSDP unit is complete: our own copy
        elif tensor.dtype != dt:
            t = tensor.to(dt) if slot is None else self._ws.get(f"cast{slot}", tensor.shape, dt).copy_(tensor)
        else:
            t = tensor
        self.tensor_meta[name] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        self._done.add(name)
        return t

    def _write_single(self, name: str, t: torch.Tensor) -> None:
        """safetensors / HF outputs: one file, tensors in plan order."""
        if self.spec.format == "hf_opt":
            from checkpoints_tools.convert_hf import to_hf_items
            for hn, ht in to_hf_items(name, t, cfg=self.cfg):
                self._st.add(hn, ht)
        else:
            self._st.add(name, t)

    def _write_rank(self, r: int, name: str, piece: Any) -> None:
        """Rank ``r``'s piece of ``name`` into its file(s). Touches only rank ``r``'s state, so
        ranks may be written by different threads (each in order)."""
        if self.spec.fsdp:  # kept until the unit is complete: views of the caller's own copy
            pass
        elif isinstance(piece, tuple):  # qkv blocks -> one contiguous piece
            rows = sum(p.shape[0] for p in piece)
            buf = self._rank_ws[r].get("piece", (rows, *piece[0].shape[1:]), piece[0].dtype)
            piece = torch.cat(piece, dim=0, out=buf)
        elif not piece.is_contiguous():  # a column block (row-parallel linear)
            piece = self._rank_ws[r].get("piece", piece.shape, piece.dtype).copy_(piece)
        if name in TIED and all(x in self.shapes for x in TIED) and not self._expect_tied:
            sha = hashlib.sha256(piece.contiguous().view(-1).view(torch.uint8).numpy().data).hexdigest()
            if name == TIED[0]:
                self._tied_sha[r] = sha
            elif sha == self._tied_sha[r] and self._tied_stub[r] is not None:
                # Tied output projection: alias the embedding's storage (as torch.save would).
                if not self.spec.fsdp:
                    self._plain[r][name] = self._tied_stub[r]
                return
            elif self.spec.fsdp:
                raise OutputError(f"tensor {name} differs from {TIED[0]}: cannot write it tied into FSDP shards")
        if self.spec.fsdp:
            self._fsdp[r].add(name, piece)
            if name == TIED[0]:
                self._tied_stub[r] = True
        else:
            stub = self._pt[r][0].add(piece)
            self._plain[r][name] = stub
            if name == TIED[0]:
                self._tied_stub[r] = stub

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` now. It may be a caller's reused buffer: nothing keeps a reference."""
        for f in self.add_async(name, tensor, slot=0, pools=None):
            f.result()

    def add_async(self, name: str, tensor: torch.Tensor, *, slot: int | None,
                  pools: Sequence[concurrent.futures.Executor] | None) -> list[concurrent.futures.Future]:
        """Cast and split ``tensor`` here, then write rank r's piece on ``pools[r]`` (one
        single-thread executor per output rank; None = write now). ``tensor`` and this slot's
        cast buffer must stay untouched until the returned futures are done."""
        if self._error is not None:
            raise self._error
        t = self._prepare(name, tensor, slot)
        if self._st is not None:
            return [_submit(pools[0] if pools else None, self._guarded, self._write_single, name, t)]
        return [_submit(pools[r] if pools else None, self._guarded, self._write_rank, r, name, piece)
                for r, piece in enumerate(self._pieces(name, t))]

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One queued write: skipped (raising the first failure) once a write failed or
        ``abort`` began, so a failed file never shows up as a later, confusing error."""
        if self._error is not None:
            raise self._error
        try:
            return fn(*args)
        except BaseException as e:  # noqa: B036 - recorded, re-raised
            first = self.record_error(e)
            if first is e:
                raise
            raise first from None

    def record_error(self, e: BaseException) -> BaseException:
        """Keep ``e`` if it is the first failure of this output; returns the first failure."""
        with self._error_lock:
            if self._error is None:
                self._error = e
            return self._error

    @property
    def first_error(self) -> BaseException | None:
        return self._error

    def commit(self, *, manifest_extra: Mapping[str, Any]) -> Path:
        """Close every file, write vocab.json and manifest.json (last), then put the directory
        in place (``install_output``: atomic, also when it replaces an earlier output)."""
        if self._error is not None:
            raise self._error
        if self.tmp is None:
            raise OutputError(f"{self.out}: commit before open")
        missing = [n for n in self.shapes if n not in self._done]
        if missing:
            raise OutputError(f"{len(missing)} tensor(s) never produced, e.g. {missing[:3]}")
        files: dict[str, dict[str, Any]] = {}
        if self._st is not None:
            sha, nb = self._st.finish()
            files[self._st.path.name] = {"sha256": sha, "bytes": nb}
        else:
            meta = checkpoint_meta(self.cfg, mp=self.spec.mp, fsdp=self.spec.fsdp, vocab=self.vocab)
            for r, rank in enumerate(self._pt):
                for j, w in enumerate(rank):
                    obj = dict(meta)
                    if self.spec.fsdp:
                        obj["model"] = self._fsdp[r].models[j]
                        obj["shard_metadata"] = self._fsdp[r].shard_metadata(j)
                    else:
                        obj["model"] = self._plain[r]
                    sha, nb = w.finish(obj)
                    files[w.path.name] = {"sha256": sha, "bytes": nb}
        if self.spec.format == "hf_opt":
            data = (json.dumps(self._hf_config, indent=2) + "\n").encode()
            self._write_small("config.json", lambda path: path.write_bytes(data))
            files["config.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        if self.vocab:
            data = (json.dumps(dict(self.vocab), indent=2) + "\n").encode()
            self._write_small("vocab.json", lambda path: path.write_bytes(data))
            files["vocab.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        manifest = {
            "manifest_version": 1,
            "created_by": "jam-ckpt",
            "config": self.cfg.to_dict(),
            "layout": {"format": self.spec.format, "mp": self.spec.mp, "fsdp": self.spec.fsdp,
                       "name": self.spec.name,
                       "dtype": str(self.spec.dtype).replace("torch.", "") if self.spec.dtype else None},
            "files": files,
            "tensors": self.tensor_meta,
            "vocab": "vocab.json" if self.vocab else None,
            **dict(manifest_extra),
        }
        self._write_small("manifest.json", lambda path: write_json_fsync(path, manifest))
        _fsync_dir(self.tmp)
        # mkdtemp made it 0700; the output is shared like any other directory the user makes.
        os.chmod(self.tmp, 0o777 & ~current_umask())
        # Checked again: the target may have changed while the model was written.
        check_output_target(self.out, overwrite=self.spec.overwrite, overwrite_any_dir=self.spec.overwrite_any_dir,
                            inputs=self.inputs)
        tmp, self.tmp = self.tmp, None
        try:
            install_output(tmp, self.out, replace=os.path.lexists(self.out))
        except BaseException:  # noqa: B036 - whatever is left at tmp (new or old output) is removed by abort
            self.tmp = tmp
            raise
        return self.out

    def _write_small(self, name: str, write: Callable[[Path], Any]) -> None:
        try:
            write(self.tmp / name)
        except OSError as e:
            raise write_error(self._shown(name), e) from e

    def abort(self) -> None:
        """Stop: queued writes are skipped, the files discarded, the temp dir removed."""
        self.record_error(OutputError(f"{self.out}: writing was aborted"))
        for rank in self._pt:
            for w in rank:
                w.abort()
        if self._st is not None:
            self._st.abort()
        if self.tmp is not None:
            _remove_tree(self.tmp)
            self.tmp = None


def _submit(pool: concurrent.futures.Executor | None, fn: Any, *args: Any) -> concurrent.futures.Future:
    if pool is not None:
        return pool.submit(fn, *args)
    f: concurrent.futures.Future = concurrent.futures.Future()
    f.set_result(fn(*args))
    return f


def write_json_fsync(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path, *, chunk: int = 16 << 20,
                before_read: Callable[[int], bool] | None = None) -> str | None:
    """sha256 hex digest of ``path``, read sequentially. ``before_read(pos)`` runs before each
    read (it may wait, e.g. to pace the reads); returning False stops the hash (-> None)."""
    h = hashlib.sha256()
    view = memoryview(bytearray(chunk))
    pos = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            if before_read is not None and not before_read(pos):
                return None
            n = f.readinto(view)
            if not n:
                break
            h.update(view[:n])
            pos += n
    return h.hexdigest()

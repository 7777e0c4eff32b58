"""Safe, lazy loading of pickled torch checkpoints (metaseq/fairseq ``.pt`` files).

Checkpoints are pickles; a converter must not run code from them. We load with
``weights_only=True`` plus an allow-list of the few non-tensor globals metaseq and fairseq store
(``argparse.Namespace`` in ``cfg["model"]``, numpy scalars in meters); anything else is refused
with the offending global named, unless the caller opts into ``trust_pickle``.
Files are memory-mapped (``mmap=True``): tensors are views of the file and nothing is read until
a tensor is needed; ``MappedFile.read`` then ``pread``s that tensor's bytes (located through the
mapping) into fresh memory, so file pages never pile up in our RSS and streaming a 26B model
keeps memory at a few tensors (``docs/CHECKPOINTS.md``, Files).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import ctypes.util
import mmap as _mmap
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jam_metaseq.errors import JamError
from jam_metaseq.inputs import InputError, open_zip_member, unique_zip_names


class CheckpointError(JamError, ValueError):
    """A checkpoint that cannot be read or combined; the message names the file and tensor."""


class UnsafePickleError(CheckpointError):
    """The pickle names a global outside the allow-list."""


def _numpy_globals() -> list[Any]:
    out: list[Any] = [np.dtype, np.ndarray]
    for mod_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            mod = __import__(mod_name, fromlist=["scalar"])
        except Exception:  # pragma: no cover - depends on numpy version
            continue
        for attr in ("scalar", "_reconstruct"):
            if hasattr(mod, attr):
                out.append(getattr(mod, attr))
    # np.dtype(...) pickles through its concrete class (numpy.dtypes.Float64DType, ...).
    for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_, np.uint8, np.int8):
        out.append(type(np.dtype(t)))
    return out


ALLOWED_GLOBALS: list[Any] = [argparse.Namespace, *_numpy_globals()]
"""What metaseq/fairseq checkpoints contain besides tensors, dicts, lists and scalars."""


MAX_PICKLE_BYTES = 256 << 20
"""Bound of a checkpoint's inflated ``data.pkl`` (the pickle holds names, shapes and small state:
a 26B model's is a few MB; a deflate bomb's 1.5 GB is refused before torch inflates it whole)."""


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except (OSError, zipfile.BadZipFile):  # a corrupt zip64 end record raises instead of saying no
        return False


def safe_torch_load(path: str | os.PathLike, *, trust_pickle: bool = False, mmap: bool = True) -> Any:
    """``torch.load`` a checkpoint safely: allow-listed globals only, memory-mapped when possible.

    Raises ``UnsafePickleError`` naming the global when the pickle needs anything else (unless
    ``trust_pickle``), and ``CheckpointError`` naming the file when it is truncated or not a
    checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (truncated?)")
    is_zip = _is_zip(path)
    if not is_zip and not _looks_like_legacy_pickle(path):
        raise CheckpointError(f"{path}: not a torch checkpoint (no zip central directory: truncated?)")
    if is_zip:
        check_torch_zip(path)
    use_mmap = mmap and is_zip  # legacy (pre-1.6, non-zip) files cannot be mapped
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=use_mmap)
        with _allowed_globals():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg or "weights_only" in msg.lower():
            bad = _unsafe_globals(path)
            what = ", ".join(bad) if bad else msg.splitlines()[0]
            raise UnsafePickleError(
                f"{path}: refusing to unpickle global(s) {what} (not on the allow-list); "
                "pass --trust-pickle only if you trust this file"
            ) from None
        raise CheckpointError(f"{path}: cannot unpickle ({msg.splitlines()[0]})") from None
    except Exception as e:  # noqa: BLE001 - whatever torch.load trips over is this file's fault
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or corrupt?): {first}") from None


# ---- the zip records behind a memory-mapped load -------------------------------------------------


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name


class _StorageRef:
    def __init__(self, key: str) -> None:
        self.key = key


class _TensorRef:
    def __init__(self, storage: Any) -> None:
        self.key = storage.key if isinstance(storage, _StorageRef) else None


class _Anything:
    """Stands for every other global while a pickle is scanned: accepts any construction and
    state, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Anything":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Anything":
        return _Anything()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, x: Any) -> None:
        pass

    def extend(self, xs: Any) -> None:
        pass


def _rebuild_ref(storage: Any, *args: Any) -> _TensorRef:
    return _TensorRef(storage)


class _ScanUnpickler(pickle.Unpickler):
    """Reads a torch ``data.pkl`` for its storage references only: no global is imported (each
    is a placeholder), tensors become ``_TensorRef``s naming their storage's record."""

    def __init__(self, f: Any) -> None:
        super().__init__(f)
        self.storages: list[tuple[str, str, Any]] = []  # (key, storage type name, numel)

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor", "_rebuild_parameter"):
            return _rebuild_ref if name != "_rebuild_parameter" else (lambda t, *a: t)
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        return _Anything

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        self.storages.append((pid[2], pid[1].name, pid[4]))
        return _StorageRef(pid[2])


def _tensor_names(obj: Any, prefix: str = "", out: dict[str, str] | None = None) -> dict[str, str]:
    """storage key -> the first tensor (dotted path) that uses it."""
    out = {} if out is None else out
    if isinstance(obj, _TensorRef):
        if obj.key is not None:
            out.setdefault(obj.key, prefix)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensor_names(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensor_names(v, f"{prefix}.{i}" if prefix else str(i), out)
    return out


_STORAGE_DTYPES = {name: dt for dt, name in torch.storage._dtype_to_storage_type_map().items()}


def _record_ends_at(f: Any, local: bytes, info: zipfile.ZipInfo, end: int) -> bool:
    """The record whose local header is ``local`` really ends at ``end``: its data descriptor
    (torch writes one, flag bit 3) follows there with the directory's sizes, or else the local
    header holds those sizes. A local header whose lengths are off would put the data elsewhere
    (torch maps it from there), and no descriptor would sit at the end."""
    size = info.file_size
    if not int.from_bytes(local[6:8], "little") & 0x8:
        return int.from_bytes(local[18:22], "little") in (size, 0xFFFFFFFF) and \
            int.from_bytes(local[22:26], "little") in (size, 0xFFFFFFFF)
    f.seek(end)
    d = f.read(24)
    if d[:4] == b"PK\x07\x08":
        d = d[4:]
    crc = int.from_bytes(d[0:4], "little")
    small = (int.from_bytes(d[4:8], "little"), int.from_bytes(d[8:12], "little"))
    big = (int.from_bytes(d[4:12], "little"), int.from_bytes(d[12:20], "little"))
    return crc == info.CRC and (small == (size, size) or big == (size, size))


def check_torch_zip(path: Path) -> None:
    """Refuse a torch zip checkpoint whose tensors would be memory-mapped from the wrong bytes.

    ``torch.load(mmap=True)`` takes each storage's size from the pickle and its place from the
    record's local header, and checks neither against the zip directory: a storage that claims
    more elements than its record holds is read on into the next records (torch's non-mmap
    load refuses it). Here every storage the pickle references must be a stored (uncompressed)
    record of exactly ``numel x item size`` bytes whose local header matches the directory and
    whose data ends where its data descriptor begins; ``data.pkl`` is read through ``zipfile``,
    so its CRC is checked. (The tensor bytes themselves are not CRC-checked: that would read the
    whole file; ``jam-ckpt verify`` checks them against the manifest's sha256.)"""
    try:
        with zipfile.ZipFile(path) as zf:
            # issue 27 §2: two records of one name would let torch read one and this check the
            # other; data.pkl is unpickled from a bounded stream, never inflated whole
            infos = unique_zip_names(zf, where=str(path))
            pkls = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                raise CheckpointError(f"{path}: not a torch zip checkpoint ({len(pkls)} data.pkl records)")
            prefix = pkls[0][: -len("data.pkl")]
            with open_zip_member(zf, pkls[0], max_bytes=MAX_PICKLE_BYTES, where=str(path)) as pkl:
                scan = _ScanUnpickler(pkl)
                obj = scan.load()
            dir_start = zf.start_dir
    except (CheckpointError, InputError):
        raise
    except Exception as e:  # noqa: BLE001 - zipfile and pickle raise many types on a corrupt file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or corrupt?): {first}") from None
    names = _tensor_names(obj)
    seen: dict[str, tuple[str, Any]] = {}
    with open(path, "rb") as f:
        for key, stype, numel in scan.storages:
            what = f"{path}: tensor {names[key]} (storage {key})" if key in names else f"{path}: storage {key}"
            if seen.setdefault(key, (stype, numel)) != (stype, numel):
                raise CheckpointError(f"{what}: referenced with two types or sizes")
            dtype = _STORAGE_DTYPES.get(stype)
            if dtype is None:
                raise CheckpointError(f"{what}: unknown storage type torch.{stype}")
            if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
                raise CheckpointError(f"{what}: bad element count {numel!r}")
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise CheckpointError(f"{what}: no record {prefix}data/{key} in the zip (truncated or corrupt?)")
            want = numel * dtype.itemsize
            if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                raise CheckpointError(f"{what}: record is compressed; torch checkpoints store tensors uncompressed")
            if info.file_size != want:
                raise CheckpointError(f"{what}: record holds {info.file_size} bytes, the pickle says {numel} "
                                      f"x {dtype} = {want} bytes (corrupt?)")
            f.seek(info.header_offset)
            local = f.read(30)
            name = info.orig_filename.encode("utf-8") if info.flag_bits & 0x800 else info.orig_filename.encode("cp437")
            if len(local) < 30 or local[:4] != b"PK\x03\x04" or \
                    int.from_bytes(local[26:28], "little") != len(name) or f.read(len(name)) != name:
                raise CheckpointError(f"{what}: the record's local header does not match the zip directory (corrupt?)")
            start = info.header_offset + 30 + len(name) + int.from_bytes(local[28:30], "little")
            if start + want > dir_start or not _record_ends_at(f, local, info, start + want):
                raise CheckpointError(f"{what}: the record's data is not where the zip directory says (corrupt?)")


@contextlib.contextmanager
def _allowed_globals():
    """``torch.serialization.safe_globals(ALLOWED_GLOBALS)``, but leaving globals the process had
    already allowed (a host's ``add_safe_globals``) allowed afterwards: torch's context manager
    removes all of its list on exit, including those that were there before."""
    before = {id(g) for g in torch.serialization.get_safe_globals()}
    new = [g for g in ALLOWED_GLOBALS if id(g) not in before]
    with torch.serialization.safe_globals(new):
        yield


def _looks_like_legacy_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80  # pickle protocol opcode


def _unsafe_globals(path: Path) -> list[str]:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return []
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in ALLOWED_GLOBALS}
    return [g for g in found if g not in allowed]


# ---- copying one tensor out of a mapped file --------------------------------------------------

_PAGE = _mmap.PAGESIZE
_MADV_DONTNEED = 4
_libc = None


def _madvise_dontneed(ptr: int, nbytes: int) -> None:
    """Drop the pages of [ptr, ptr+nbytes) from our resident set (private read-only file map)."""
    global _libc
    if nbytes <= 0 or os.name != "posix":
        return
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    start = (ptr // _PAGE) * _PAGE
    end = ((ptr + nbytes + _PAGE - 1) // _PAGE) * _PAGE
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def copy_out(view: torch.Tensor, *, mapped: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh contiguous copy of ``view`` (optionally cast); if ``view`` lives in a private file
    mapping, release its pages afterwards so the mapped file never accumulates in RSS."""
    out = view.to(dtype=dtype or view.dtype, copy=True, memory_format=torch.contiguous_format)
    if mapped and view.numel():
        # Only for mmap=True loads: the pages are clean file pages, re-read on next access.
        # (On anonymous memory MADV_DONTNEED would zero data: never call it there.)
        _madvise_dontneed(view.data_ptr(), (_max_offset(view) + 1) * view.element_size())
    return out


def release(view: torch.Tensor, *, mapped: bool) -> None:
    """Drop the resident pages of a mapped view that has been copied from (see ``copy_out``)."""
    if mapped and view.numel():
        _madvise_dontneed(view.data_ptr(), (_max_offset(view) + 1) * view.element_size())


def _max_offset(t: torch.Tensor) -> int:
    return sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)


# ---- reading a mapped tensor's bytes with pread -----------------------------------------------


class MappedFile:
    """Reads the bytes behind tensors that ``torch.load(mmap=True)`` mapped from ``path`` with
    ``pread`` into fresh memory: no page faults on the mapping and no file pages in our RSS.
    Falls back to copying from the mapping (then releasing its pages) where the mapping of a
    tensor cannot be located (non-Linux, non-contiguous views)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._maps: list[tuple[int, int, int]] | None = None
        self._fd: int | None = None

    def _locate(self, ptr: int) -> int | None:
        if self._maps is None:
            self._maps = []
            real = os.path.realpath(self.path)
            try:
                with open("/proc/self/maps") as f:
                    for line in f:
                        parts = line.split(maxsplit=5)
                        if len(parts) == 6 and parts[5].rstrip("\n") == real:
                            a, b = (int(x, 16) for x in parts[0].split("-"))
                            self._maps.append((a, b, int(parts[2], 16)))
            except OSError:
                pass
        for a, b, off in self._maps:
            if a <= ptr < b:
                return off + (ptr - a)
        self._maps = None  # the mapping may be newer than our snapshot: re-read next time
        return None

    def read(self, view: torch.Tensor, *, dest: torch.Tensor | None = None,
             dtype: torch.dtype | None = None, scratch: Any = None) -> torch.Tensor:
        """Copy ``view`` into ``dest`` (same shape; any strides/dtype) or a new tensor. A cast or
        strided ``dest`` goes through a contiguous buffer: ``scratch.get("read", shape, dtype)``
        (a ``workspace.Workspace``) if given, else a fresh one."""
        if dest is None:
            dest = torch.empty(view.shape, dtype=dtype or view.dtype)
        nbytes = view.numel() * view.element_size()
        off = self._locate(view.data_ptr()) if view.is_contiguous() and nbytes else None
        if off is None:
            dest.copy_(view)
            # Release pages only of a view known to lie in this file's mapping: a legacy (pre-zip)
            # file is loaded into anonymous memory, where MADV_DONTNEED zeroes live data.
            if nbytes and self._locate(view.data_ptr()) is not None:
                release(view, mapped=True)
            return dest
        direct = dest.dtype == view.dtype and dest.is_contiguous()
        if direct:
            buf = dest
        elif scratch is not None:
            buf = scratch.get("read", view.shape, view.dtype)
        else:
            buf = torch.empty(view.shape, dtype=view.dtype)
        mv = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        got = 0
        while got < nbytes:
            n = os.preadv(self._fd, [mv[got:]], off + got)
            if n <= 0:
                raise CheckpointError(f"{self.path}: truncated while reading a tensor at byte {off + got}")
            got += n
        if not direct:
            dest.copy_(buf)
        return dest

    def __del__(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass

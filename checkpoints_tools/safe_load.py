"""Safe, lazy loading of pickled torch checkpoints (metaseq/fairseq ``.pt`` files).

Checkpoints are pickles; a converter must not run code from them. We load with
``weights_only=True`` plus an allow-list of the few non-tensor globals metaseq and fairseq store
(``argparse.Namespace`` in ``cfg["model"]``, numpy scalars in meters); anything else is refused
with the offending global named, unless the caller opts into ``trust_pickle``.
Files are memory-mapped (``mmap=True``): tensors are views of the file and nothing is read until
a tensor is needed; ``MappedFile.read`` then ``pread``s that tensor's bytes (located through the
mapping) into fresh memory, so file pages never pile up in our RSS and streaming a 26B model
keeps memory at a few tensors (``reference/metaseq.md``, Checkpoints).
"""

from __future__ import annotations

import argparse
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


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
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
    use_mmap = mmap and _is_zip(path)  # legacy (pre-1.6, non-zip) files cannot be mapped
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (truncated?)")
    if not use_mmap and not _looks_like_legacy_pickle(path):
        raise CheckpointError(f"{path}: not a torch checkpoint (no zip central directory: truncated?)")
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
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or corrupt?): {first}") from None


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

"""The shared lazy-tensor machinery of every reader: ``Reader``, a consolidated (MP=1), read-only
view of one checkpoint with metaseq key names, whose ``get_into(name, out)`` reads one tensor
straight into the caller's buffer; ``TensorInfo``; the checks every format applies (parameters are
floating point; model-parallel copies of a replicated tensor agree, ``REPLICA_MISMATCH``).
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from checkpoints_tools.readers.infer import resolve_config
from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.models import keys
from jam_metaseq.models.config import ModelConfig
from jam_metaseq.vocab import VocabManifest, find_vocab, stored_in


def check_parameter_dtype(path: Path, name: str, dtype: torch.dtype) -> None:
    """Every tensor of these models but a version counter is a floating-point parameter: an
    integer or bool dtype on one means a relabelled or corrupt file, whose bytes would be read
    as other numbers."""
    if not dtype.is_floating_point and not keys.is_version(name):
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
            if i.dtype.is_floating_point and not keys.is_version(n):
                seen.setdefault(i.dtype, n)
        if len(seen) > 1:
            desc = ", ".join(f"{d} ({n})" for d, n in seen.items())
            raise CheckpointError(f"{self.path}: mixed parameter dtypes: {desc}")
        return next(iter(seen), torch.float32)

    def num_params(self) -> int:
        """Parameters (version buffers and an output projection tied to the embedding not counted)."""
        tied = self.tied(*keys.TIED)
        return sum(i.numel for n, i in self._infos.items()
                   if not keys.is_version(n) and not (n == keys.OUTPUT and tied))

    def config(self, **overrides: Any) -> ModelConfig:
        """The model config: stored ``jam_config`` (or a trained checkpoint's task state, the jam-ckpt
    manifest, ``cfg["model"].jam_config``, a ``config.json`` of ours beside it), else inferred from
    ``cfg["model"]`` + shapes (``resolve_config``)."""
        return resolve_config(self, **overrides)

    def vocab(self, given: VocabManifest | str | os.PathLike | None = None) -> VocabManifest | None:
        """The checkpoint's vocabulary manifest (``jam_metaseq.vocab.find_vocab``): ``given`` if
        any, else the one stored in it, else a ``vocab.json`` in its directory (or beside its
        file); None when there is none."""
        return find_vocab(given=given, stored=lambda: stored_in(self.meta),
                          beside=self.path if self.path.is_dir() else self.path.parent, source=str(self.path))

    def close(self) -> None:  # mapped files are released when the reader is dropped
        pass

    def describe(self) -> str:
        lay = f"MP={self.mp}" + (f", FSDP shards={self.fsdp}" if self.fsdp else "")
        return f"{self.format} ({lay}, {len(self.files)} file(s))"

"""One ``.pt`` file written record by record: each tensor's bytes go to disk when it is added
(torch's own ``PyTorchFileWriter``, CRCs by ``ZipCrcs``), and the pickle (``data.pkl``) of the
object tree is written last, its tensors as stubs that pickle exactly like the stored ones, so
a file of any size is never held in memory.
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.serialization import _get_storage_alignment

from checkpoints_tools.io.hashed_file import HashedFile
from checkpoints_tools.io.zip_crc import ZipCrcs


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
        self._file = HashedFile(path, shown=shown)
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


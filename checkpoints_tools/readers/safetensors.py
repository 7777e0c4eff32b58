"""safetensors checkpoints: one file, several (a directory of them, or an index's
``weight_map``), read with ``pread`` straight into the caller's buffer. Headers are validated
as the reference library validates them (``io/safetensors.py``); ``__metadata__`` carries our
config and vocabulary, and names a tied tensor stored once.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Sequence

import torch

from checkpoints_tools.io.safetensors import read_safetensors_header, read_safetensors_index
from checkpoints_tools.readers.base import Reader, TensorInfo, check_parameter_dtype
from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.models.config import CHECKPOINT_KEY as CONFIG_KEY
from checkpoints_tools.workspace import Workspace
from jam_metaseq.inputs import loads_json
from jam_metaseq.vocab import CHECKPOINT_KEY as VOCAB_KEY

_JSON_METADATA = (CONFIG_KEY, VOCAB_KEY)
"""``__metadata__`` entries holding JSON (jam-ckpt's): the config and the vocabulary manifest."""


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
                if k in _JSON_METADATA:
                    try:
                        self.meta[k] = loads_json(v, where=f"{f}: __metadata__ {k}")
                    except ValueError as e:
                        raise CheckpointError(f"{f}: __metadata__ {k} is not valid JSON ({e})") from None
            for k, e in header.tensors.items():
                if k in self._infos:
                    raise CheckpointError(f"{f}: tensor {k!r} is also in {self._where[k][0]}")
                check_parameter_dtype(f, k, e.dtype)
                self._infos[k] = TensorInfo(e.shape, e.dtype)
                self._where[k] = (f, header.data_start + e.begin, e.end - e.begin, 0)
            for k, v in header.metadata.items():  # safetensors' record of a dropped shared tensor
                if k not in header.tensors and v in header.tensors and k not in ("format", *_JSON_METADATA):
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



def claims(path: Path) -> bool:
    """A ``.safetensors`` file, an index (``*.safetensors.index.json``), or a directory of
    ``.safetensors`` files and no ``.pt``."""
    if path.is_dir():
        return any(path.glob("*.safetensors")) and not any(path.glob("*.pt"))
    return path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json")


def open_safetensors(path: Path, **_: object) -> SafetensorsReader:
    """The safetensors checkpoint at ``path`` (see ``claims``)."""
    if path.is_dir():
        return SafetensorsReader(sorted(path.glob("*.safetensors")), path=path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        return SafetensorsReader([path], path=path)
    wm = read_safetensors_index(path)
    return SafetensorsReader(sorted(set(wm.values())), path=path, weight_map=wm)

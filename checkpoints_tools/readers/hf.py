"""HF transformers checkpoints seen with metaseq names, through their family's adapter
(``checkpoints_tools/hf``): an HF directory (``config.json`` + ``model.safetensors`` /
``pytorch_model.bin``, single or indexed), or a bare state dict with HF names in a file of
another format (``view``). Tensors the key map fuses (OPT's q/k/v into metaseq's ``qkv_proj``)
are concatenated on read; a tied output projection is the embedding; the version buffer is
metaseq's constant.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from checkpoints_tools.hf import HFAdapter, adapter_for_config, adapter_for_names
from checkpoints_tools.io.safetensors import read_safetensors_index
from checkpoints_tools.readers.base import Reader, TensorInfo
from checkpoints_tools.readers.infer import check_config
from checkpoints_tools.readers.metaseq import MetaseqReader
from checkpoints_tools.readers.safetensors import SafetensorsReader
from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.inputs import read_json
from jam_metaseq.models import keys
from jam_metaseq.models.config import ModelConfig

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
"""The weight files of an HF directory, in the order they are looked for."""


class HFReader(Reader):
    """An HF checkpoint of one family (``adapter``) seen with metaseq names."""

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
            raw = MultiReader([MetaseqReader({0: {0: f}}, path=f, trust_pickle=trust_pickle, fsdp=False)
                               for f in files], path=path)
        elif (path / "pytorch_model.bin").is_file():
            raw = MetaseqReader({0: {0: path / "pytorch_model.bin"}}, path=path, trust_pickle=trust_pickle,
                                fsdp=False)
        else:
            raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin")
        source = str(path / "config.json")
        hf = read_json(path / "config.json", what="HF config")
        self._init(raw, path, hf, source, adapter_for_config(hf, source=source))

    @classmethod
    def from_reader(cls, raw: Reader, *, path: Path, adapter: HFAdapter) -> "HFReader":
        """``raw`` (a state dict with ``adapter``'s HF names) seen with metaseq names; its config
        from a ``config.json`` beside it if there is one."""
        self = cls.__new__(cls)
        cfg_file = (path if path.is_dir() else path.parent) / "config.json"
        hf = read_json(cfg_file, what="HF config") if cfg_file.is_file() else None
        self._init(raw, path, hf, str(cfg_file), adapter)
        return self

    def _init(self, raw: Reader, path: Path, hf: Mapping[str, Any] | None, source: str, adapter: HFAdapter) -> None:
        a = adapter
        self.raw, self.path, self.format, self.adapter = raw, path, f"hf_{a.model_type}", a
        self.mp, self.fsdp, self.files = 1, 0, list(raw.files)
        self.meta = dict(raw.meta)
        self.hf_config = dict(hf) if hf else None
        names = raw.names()
        self.prefix = a.prefix if any(n.startswith(a.prefix + a.root) for n in names) else ""
        self._hf_cfg = a.config_from_hf(hf, source=source) if hf else None
        self._map: dict[str, Any] = {}  # metaseq name -> HF name, or the HF names it concatenates
        self._versions: set[str] = set()
        p = self.prefix
        head, blocks, tail = [], [], []  # the key map's top-level keys before and after its blocks
        for k, v in a.key_map.items():
            (blocks if "{}" in k else tail if blocks else head).append((k, v))
        layers = sorted({int(n[len(p) + len(a.layers) + 1:].split(".")[0]) for n in names
                         if n.startswith(f"{p}{a.layers}.")})
        # metaseq order: embeddings, then per layer, then final LN, then output projection.
        ordered: OrderedDict[str, TensorInfo] = OrderedDict()

        def place(name: str, hf_name: Any, i: int | None = None) -> None:
            if isinstance(hf_name, tuple):  # rows of several HF tensors, concatenated
                parts = [p + t.format(i) for t in hf_name]
                if all(x in raw for x in parts):
                    infos = [raw.info(x) for x in parts]
                    self._map[name] = parts
                    ordered[name] = TensorInfo((sum(x.shape[0] for x in infos), *infos[0].shape[1:]), infos[0].dtype)
            elif hf_name is not None:
                src = p + (hf_name.format(i) if i is not None else hf_name)
                if src in raw:
                    self._map[name] = src
                    ordered[name] = raw.info(src)
            elif name in a.tied:  # stored as another tensor (the output projection: the embedding)
                ordered[name] = ordered[a.tied[name]]
                self._map[name] = self._map[a.tied[name]]
            elif keys.is_version(name):  # metaseq's constant buffer (dtype: the embedding's, below)
                ordered[name] = TensorInfo((1,), torch.float32)
                self._versions.add(name)

        for k, v in head:
            place(k, v)
        for i in layers:
            for tpl, v in blocks:
                place(tpl.format(i), v, i)
        emb = ordered.get(keys.EMBED)
        if emb is None:
            raise CheckpointError(f"{path}: no {p}{a.key_map[keys.EMBED]}: not an {a.display} checkpoint")
        for k, v in tail:
            place(k, v)
        for k in self._versions:
            ordered[k] = TensorInfo((1,), emb.dtype)
        self._infos = ordered
        unknown = [n for n in names if not a.is_hf_name(n[len(p):] if n.startswith(p) else n)]
        if unknown:
            raise CheckpointError(f"{path}: HF tensor(s) with no metaseq equivalent: {unknown[:3]}")

    def config(self, **overrides: Any) -> ModelConfig:
        if self._hf_cfg is not None:  # what the tensors prove wins over config.json (issue 27 §3)
            return check_config(self._hf_cfg, self, overrides=overrides, claimed_by="config.json")
        return super().config(**overrides)

    def tied(self, a: str, b: str) -> bool:
        return a in self._map and self._map.get(a) == self._map.get(b)  # e.g. lm_head = embed_tokens

    def get(self, name: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        info = self.info(name)
        if name in self._versions:
            return torch.tensor([keys.VERSION_VALUE], dtype=dtype or info.dtype)
        src = self._map[name]
        if isinstance(src, list):
            return torch.cat([self.raw.get(s, dtype=dtype) for s in src], dim=0)
        return self.raw.get(src, dtype=dtype)


class MultiReader(Reader):
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


def claims(path: Path) -> bool:
    """An HF directory: ``config.json`` and one of ``WEIGHT_FILES``."""
    return path.is_dir() and (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def open_hf_dir(path: Path, *, trust_pickle: bool = False, **_: object) -> HFReader:
    """The HF directory at ``path``, its family from ``config.json``'s ``model_type``."""
    return HFReader(path, trust_pickle=trust_pickle)


def view(reader: Reader, path: Path) -> Reader:
    """``reader`` seen with metaseq names if its tensors have an HF family's names, else itself."""
    adapter = adapter_for_names(reader.names())
    return reader if adapter is None else HFReader.from_reader(reader, path=path, adapter=adapter)

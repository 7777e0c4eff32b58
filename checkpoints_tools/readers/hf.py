"""HF transformers checkpoints seen with our names, through their family's key map
(``jam_metaseq.models.hf_families``: OPT, Llama, Qwen2, Gemma, Chameleon's decoder): an HF directory (``config.json`` +
``model.safetensors`` / ``pytorch_model.bin``, single or sharded with an index), or a bare state dict
with HF names in a file of another format (``view``). Tensor by tensor, each read straight into the
caller's buffer (a 7B parent is never whole in memory); tensors the key map fuses (OPT's q/k/v into
metaseq's ``qkv_proj``) are read into their rows; a tied output projection is the embedding; the
version buffer is our constant.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from checkpoints_tools.io.safetensors import read_safetensors_index
from checkpoints_tools.readers.base import Reader, TensorInfo
from checkpoints_tools.readers.infer import check_config
from checkpoints_tools.readers.metaseq import MetaseqReader
from checkpoints_tools.readers.safetensors import SafetensorsReader
from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.inputs import int_field, read_json
from jam_metaseq.models import keys
from jam_metaseq.models.config import ModelConfig
from jam_metaseq.models.hf_families import HF_OUTPUT, HFFamily, family_by_names, family_of, template

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
"""The weight files of an HF directory, in the order they are looked for."""


class HFReader(Reader):
    """An HF checkpoint of one family (``family``, ``jam_metaseq.models.hf_families``) seen with our names."""

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
        hf = read_hf_config(path / "config.json")
        self._init(raw, path, hf, source, _family_of(hf, source))

    @classmethod
    def from_reader(cls, raw: Reader, *, path: Path, family: HFFamily) -> "HFReader":
        """``raw`` (a state dict with ``family``'s HF names) seen with our names; its config from a
        ``config.json`` beside it if there is one (whose ``model_type`` then names the family)."""
        self = cls.__new__(cls)
        cfg_file = (path if path.is_dir() else path.parent) / "config.json"
        hf = read_hf_config(cfg_file) if cfg_file.is_file() else None
        if hf is not None:
            family = _family_of(hf, str(cfg_file))
        self._init(raw, path, hf, str(cfg_file), family)
        return self

    def _init(self, raw: Reader, path: Path, hf: Mapping[str, Any] | None, source: str, family: HFFamily) -> None:
        fam = family
        self.raw, self.path, self.format, self.family = raw, path, f"hf_{fam.model_type}", fam
        self.mp, self.fsdp, self.files = 1, 0, list(raw.files)
        self.meta = dict(raw.meta)
        self.hf_config = dict(hf) if hf else None
        self._source = source
        names = [n for n in raw.names() if not fam.is_other_part(n)]  # Chameleon's VQ model: hf_vqvae's
        bare = not any(n.startswith(fam.prefix) for n in names)  # a base model's state dict (no "model.")
        tied = fam.ties(hf) if hf else HF_OUTPUT not in names
        self._tied_output = tied

        def stored(h: str) -> str:
            return h.removeprefix(fam.prefix) if bare else h

        self._map: dict[str, Any] = {}  # our name -> HF name, or the HF names whose rows it concatenates
        self._versions: set[str] = set()
        head, blocks, tail = [], [], []  # the key map's top-level keys before and after its blocks
        for k in fam.key_map:
            (blocks if "{}" in k else tail if blocks else head).append(k)
        layers = sorted({int(i) for n in names for _, i in [template(n)] if i is not None and fam.is_hf_name(n)})
        # our order: embeddings, then per layer, then the final norm, then the output projection.
        ordered: OrderedDict[str, TensorInfo] = OrderedDict()

        def place(name: str) -> None:
            if name == keys.OUTPUT and tied:  # stored as the embedding
                if keys.EMBED in ordered:
                    ordered[name] = ordered[keys.EMBED]
                    self._map[name] = self._map[keys.EMBED]
                return
            if keys.is_version(name):  # our constant buffer (dtype: the embedding's, below)
                ordered[name] = TensorInfo((1,), torch.float32)
                self._versions.add(name)
                return
            srcs = [stored(h) for h in fam.hf_names(name, tied=tied)]
            if not srcs or not all(s in raw for s in srcs):
                return
            if len(srcs) == 1:
                self._map[name] = srcs[0]
                ordered[name] = raw.info(srcs[0])
            else:  # rows of several HF tensors, concatenated
                infos = [raw.info(s) for s in srcs]
                self._map[name] = srcs
                ordered[name] = TensorInfo((sum(x.shape[0] for x in infos), *infos[0].shape[1:]), infos[0].dtype)

        for k in head:
            place(k)
        for i in layers:
            for tpl in blocks:
                place(tpl.format(i))
        emb = ordered.get(keys.EMBED)
        if emb is None:
            raise CheckpointError(f"{path}: no {stored(fam.key_map[keys.EMBED])}: not an HF {fam.display} checkpoint")
        for k in tail:
            place(k)
        for k in self._versions:
            ordered[k] = TensorInfo((1,), emb.dtype)
        self._infos = ordered
        unknown = [n for n in names if not fam.is_hf_name(n)]
        if unknown:
            raise CheckpointError(f"{path}: HF tensor(s) with no counterpart in our {fam.display} layout: {unknown[:3]}")

    def config(self, **overrides: Any) -> ModelConfig:
        """The model of its ``config.json`` (``family.config_from_hf``). HF Llama names no padding
        id: ``overrides["padding_idx"]`` (the vocabulary in use), else the checkpoint's own
        vocabulary manifest (``vocab``) names it."""
        if self.hf_config is None:
            return super().config(**overrides)
        pad = overrides.get("padding_idx")
        if pad is None and self.hf_config.get("pad_token_id") is None:
            v = self.vocab()
            pad = None if v is None else v.pad
        try:
            cfg = self.family.config_from_hf(self.hf_config, source=self._source, padding_idx=pad)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        return check_config(cfg, self, overrides=overrides, claimed_by="config.json")  # the tensors win (issue 27 §3)

    def vocab(self, given: Any = None) -> Any:
        """As ``Reader.vocab``; else the manifest the family's ``config.json`` states (Chameleon's
        ``vocabulary_map``: ``HFFamily.vocab_from_hf``)."""
        v = super().vocab(given)
        if v is None and self.hf_config and self.hf_config.get("vocabulary_map") and self.family.vocab_from_hf:
            try:
                tok = self.path / "tokenizer.json"  # an HF directory's text tokenizer, if it has one
                v = self.family.vocab_from_hf(self.hf_config, source=self._source,
                                              text_tokenizer=str(tok) if tok.is_file() else None)
            except ValueError as e:
                raise CheckpointError(str(e)) from None
        return v

    def tied(self, a: str, b: str) -> bool:
        return a in self._map and self._map.get(a) == self._map.get(b)  # e.g. lm_head = embed_tokens

    def prefetch(self, name: str) -> None:
        src = self._map.get(name)
        for s in src if isinstance(src, list) else [] if src is None else [src]:
            self.raw.prefetch(s)

    def get_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        self._start_read(name, out)
        if name in self._versions:
            return out.fill_(keys.VERSION_VALUE)
        src = self._map[name]
        if isinstance(src, list):  # rows of several HF tensors, each read into its rows of ``out``
            row = 0
            for s in src:
                n = self.raw.info(s).shape[0]
                self.raw.get_into(s, out[row:row + n])
                row += n
            return out
        return self.raw.get_into(src, out)


HF_COUNTS = ("num_hidden_layers", "hidden_size", "intermediate_size", "ffn_dim", "num_attention_heads",
             "num_key_value_heads", "vocab_size", "max_position_embeddings", "head_dim", "word_embed_proj_dim")
"""The sizes an HF ``config.json`` may hold, each a positive integer where given (``head_dim`` and
``num_key_value_heads`` may be null: the family's default)."""


def read_hf_config(path: Path) -> dict[str, Any]:
    """An HF ``config.json`` (bounded JSON) whose sizes are positive integers (issue 27 §3: a field
    is checked where it is read, naming the file and the field; ``2.5`` layers is not a count).
    Whether they agree with the tensors is ``readers.infer.check_config``'s question."""
    hf = read_json(path, what="HF config")
    for key in HF_COUNTS:
        if key in hf and not (hf[key] is None and key in ("head_dim", "num_key_value_heads")):
            int_field(hf[key], name=key, source=str(path), lo=1)
    return hf


def _family_of(hf: Mapping[str, Any], source: str) -> HFFamily:
    try:
        return family_of(hf, source=source)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


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
    """``reader`` seen with our names if its tensors have an HF family's names, else itself."""
    if isinstance(reader, HFReader):
        return reader
    family = family_by_names(reader.names())
    return reader if family is None else HFReader.from_reader(reader, path=path, family=family)

"""GGUF checkpoints of the llama architecture (llama.cpp's format; issue 28) seen with metaseq names.

A ``.gguf`` file is read through its validated header (``io/gguf.py``) one tensor at a time: each
tensor's bytes come straight from the memory-mapped file and are dequantized on the way
(``gguf.quants.dequantize``, llama.cpp's own Python code) to float32, which holds every value of
the types read exactly: ``SUPPORTED_TYPES``. Any other type (``Q5_K``, ``IQ2_XS``, ...) and any
architecture but ``llama`` are refused by name when the file is opened.

The llama architecture is HF's Llama (``jam_metaseq/models/hf_families/llama.py``) stored in llama.cpp's
spelling, so the map is GGUF -> HF, then HF -> ours through the family key map:

- names: ``KEY_MAP`` (GGUF template -> HF template, ``{}`` the block index; the same pairs as the
  ``gguf`` package's ``TensorNameMap``, which ``tests/test_ckpt_gguf.py`` checks);
- config: ``CONFIG_KEYS`` (``llama.*`` metadata -> ``config.json`` keys) into the family's
  ``config_from_hf``; the output projection is tied when the file has no ``output.weight``;
- rotary row order: llama.cpp's converter reorders the q and k rows of every head for its
  interleaved rotary (``models/rotary.py``); reading undoes it (``ROTARY_ROWS``), so the q/k
  projections come back in HF's half-split order, the one our decoder computes.

``padding_idx`` (the id our decoder masks as padding) is the file's padding token unless that is a
token text produces (SmolLM2 pads with its end-of-turn ``<|im_end|>``, which every chat turn
holds): then its unknown token (``<|endoftext|>``); ``padding_rule`` says which.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from checkpoints_tools.io.gguf import GGUFHeader, GGUFTensor, read_gguf_header
from checkpoints_tools.readers.base import Reader, TensorInfo
from checkpoints_tools.readers.infer import check_config
from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.models import hf_families, keys
from jam_metaseq.models.config import DecoderConfig
from jam_metaseq.models.rotary import interleaved_to_half_split

ARCHITECTURES = ("llama",)
"""``general.architecture`` values read."""
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
"""ggml tensor types read (dequantized to float32, exactly)."""

KEY_MAP: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    **{f"blk.{{}}.{g}.{kind}": f"model.layers.{{}}.{h}.{kind}"
       for g, h in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                    ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                    ("ffn_down", "mlp.down_proj"))
       for kind in ("weight", "bias")},
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
}
"""GGUF tensor template (llama architecture) -> HF Llama's."""
ROTARY_ROWS: dict[str, str] = {
    "blk.{}.attn_q.weight": "heads", "blk.{}.attn_q.bias": "heads",
    "blk.{}.attn_k.weight": "kv_heads", "blk.{}.attn_k.bias": "kv_heads",
}
"""GGUF tensors whose rows llama.cpp stores in the interleaved rotary order, and whose heads
group them (q: the attention heads; k: the key/value heads)."""
REFUSED_TENSORS: dict[str, str] = {
    "rope_freqs.weight": "per-frequency rope factors (llama-3.1 style scaling)",
    "blk.{}.ffn_gate_inp.weight": "a mixture-of-experts router",
}
"""GGUF tensors of llama files whose computation our decoder does not have: refused by name."""

CONFIG_KEYS: dict[str, str] = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
"""``{architecture}.KEY`` metadata -> HF ``config.json`` key (HF's defaults fill what is absent)."""
REQUIRED = ("context_length", "embedding_length", "feed_forward_length", "block_count", "attention.head_count")


def _template(name: str) -> tuple[str, int | None]:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
        return ".".join(["blk", "{}", *parts[2:]]), int(parts[1])
    return name, None


def padding_rule(meta: Mapping[str, Any]) -> tuple[int | None, str]:
    """(the id to mask as padding, why): the file's padding token when it is none of its bos/eos
    (ids text and chats produce), else its unknown token (never produced by a byte-level BPE),
    else None."""
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
    used = {ids["bos"], ids["eos"]}
    if ids["padding"] is not None and ids["padding"] not in used:
        return ids["padding"], "tokenizer.ggml.padding_token_id"
    if ids["unknown"] is not None and ids["unknown"] not in used:
        return ids["unknown"], ("tokenizer.ggml.unknown_token_id (the padding token is also bos/eos, a token "
                                "text produces)" if ids["padding"] is not None else "tokenizer.ggml.unknown_token_id")
    return None, "none: the file names no padding or unknown token apart from bos/eos"


def hf_config_of(header: GGUFHeader) -> dict[str, Any]:
    """The HF ``config.json`` of a llama GGUF (``CONFIG_KEYS``); refuses what the file asks for and
    our decoder does not compute, by the metadata key."""
    meta, path = header.metadata, header.path
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: general.architecture {arch!r} is not supported (only "
                              f"{', '.join(ARCHITECTURES)})")
    missing = [f"{arch}.{k}" for k in REQUIRED if f"{arch}.{k}" not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {', '.join(missing)}")
    hf: dict[str, Any] = {"model_type": "llama", "hidden_act": "silu"}
    for k, hk in CONFIG_KEYS.items():
        v = meta.get(f"{arch}.{k}")
        if v is not None:
            if isinstance(v, (list, str, bool)):
                raise CheckpointError(f"{path}: metadata {arch}.{k} is {v!r}, not a number")
            hf[hk] = v
    for k, hk in CONFIG_KEYS.items():
        v = hf.get(hk)
        if v is not None and (v <= 0 or (hk not in ("rms_norm_eps", "rope_theta") and not isinstance(v, int))):
            raise CheckpointError(f"{path}: metadata {arch}.{k}={v!r} is not a positive "
                                  f"{'number' if hk in ('rms_norm_eps', 'rope_theta') else 'integer'}")
    if hf["num_hidden_layers"] > len(header.tensors):
        raise CheckpointError(f"{path}: {arch}.block_count={hf['num_hidden_layers']} but the file holds "
                              f"{len(header.tensors)} tensors")
    if meta.get(f"{arch}.expert_count", 0):
        raise CheckpointError(f"{path}: {arch}.expert_count={meta[f'{arch}.expert_count']}: mixture-of-experts "
                              "models are not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(meta.get(f"{arch}.rope.scaling.factor", 1.0))}
    elif scaling != "none":
        raise CheckpointError(f"{path}: {arch}.rope.scaling.type={scaling!r} is not supported (none, linear)")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or (hf["hidden_size"] // heads if heads else 0)
    for k in ("rope.dimension_count", "attention.value_length"):
        v = meta.get(f"{arch}.{k}")
        if v is not None and v != head_dim:
            raise CheckpointError(f"{path}: {arch}.{k}={v} differs from the head width {head_dim} (rotary on "
                                  "whole heads and equal key/value widths only)")
    if "vocab_size" not in hf:
        hf["vocab_size"] = len(meta.get("tokenizer.ggml.tokens") or ()) or None
    names = {_template(n)[0] for n in header.tensors}
    hf["tie_word_embeddings"] = "output.weight" not in names
    hf["attention_bias"] = "blk.{}.attn_q.bias" in names
    hf["mlp_bias"] = "blk.{}.ffn_up.bias" in names
    return hf


class GGUFReader(Reader):
    """A llama GGUF file with metaseq names; tensors dequantized to float32 on read."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        header = read_gguf_header(path)
        self.path, self.format, self.mp, self.fsdp, self.files, self.meta = path, "gguf", 1, 0, [path], {}
        self.header = header
        self.hf_config = hf_config_of(header)
        pad, self.padding_rule = padding_rule(header.metadata)
        if pad is None:
            raise CheckpointError(f"{path}: no id to mask as padding ({self.padding_rule})")
        try:
            self._cfg = hf_families.config_from_hf(self.hf_config, source=str(path), padding_idx=pad)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None
        cfg = self._cfg
        self._src: dict[str, GGUFTensor] = {}  # our name -> its GGUF record
        self._heads: dict[str, int] = {}  # our name -> heads grouping its rotary rows
        for name, t in header.tensors.items():
            self._place(name, t, cfg)
        want = keys.state_keys(cfg)
        missing = [k for k in want if k not in self._src and k not in (keys.VERSION, keys.OUTPUT)]
        if missing:
            raise CheckpointError(f"{path}: lacks {len(missing)} tensor(s) of the model its metadata describes, "
                                  f"e.g. {missing[:3]}")
        if cfg.tie_embeddings:
            self._src[keys.OUTPUT] = self._src[keys.EMBED]
        expected = _expected_shapes(cfg)
        self._infos = OrderedDict()
        for k in want:
            if k == keys.VERSION:
                self._infos[k] = TensorInfo((1,), torch.float32)
                continue
            t = self._src[k]
            if t.shape != expected[k]:
                raise CheckpointError(f"{path}: tensor {t.name} has shape {list(t.shape)} but the model its metadata "
                                      f"describes needs {list(expected[k])} ({k})")
            self._infos[k] = TensorInfo(t.shape, torch.float32)

    def _place(self, name: str, t: GGUFTensor, cfg: DecoderConfig) -> None:
        tpl, layer = _template(name)
        if tpl in REFUSED_TENSORS:
            raise CheckpointError(f"{self.path}: tensor {name} ({REFUSED_TENSORS[tpl]}) is not supported")
        if tpl not in KEY_MAP:
            raise CheckpointError(f"{self.path}: tensor {name} is not a tensor of a llama model we read")
        if t.type_name not in SUPPORTED_TYPES:
            raise CheckpointError(f"{self.path}: tensor {name} is {t.type_name}; the types read are "
                                  f"{', '.join(SUPPORTED_TYPES)}")
        if layer is not None and layer >= cfg.layers:
            raise CheckpointError(f"{self.path}: tensor {name} is beyond the {cfg.layers} blocks of the metadata")
        hf = KEY_MAP[tpl].format(layer)
        ours = hf_families.our_name(hf, cfg)
        if ours is None:  # an untied lm_head in a tied model cannot happen: tie follows output.weight
            raise CheckpointError(f"{self.path}: tensor {name} has no place in the model")
        self._src[ours] = t
        if tpl in ROTARY_ROWS:
            self._heads[ours] = cfg.heads if ROTARY_ROWS[tpl] == "heads" else cfg.num_kv_heads

    @property
    def _data(self) -> np.memmap:
        mm = self.__dict__.get("_mm")
        if mm is None:
            mm = self.__dict__["_mm"] = np.memmap(self.path, dtype=np.uint8, mode="r")
        return mm

    def config(self, **overrides: Any) -> DecoderConfig:
        return check_config(self._cfg, self, overrides=overrides, claimed_by="its GGUF metadata")

    def tied(self, a: str, b: str) -> bool:
        return a in self._src and self._src.get(a) is self._src.get(b)

    def source_name(self, name: str) -> str | None:
        """The GGUF tensor that ``name`` is read from (None: the version constant)."""
        t = self._src.get(name)
        return t.name if t is not None else None

    def prefetch(self, name: str) -> None:
        t = self._src.get(name)
        if t is not None:
            self._willneed(self.path, t.offset, t.nbytes)

    def get_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        self._start_read(name, out)
        if name == keys.VERSION:
            return out.fill_(keys.VERSION_VALUE)
        return out.copy_(self.dequantized(name))

    def dequantized(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as float32, in our layout (rotary rows in the half-split order)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self._src[name]
        raw = self._data[t.offset:t.offset + t.nbytes].reshape(-1, t.row_bytes)
        values = dequantize(raw, GGMLQuantizationType(t.ggml_type))
        values = values if values.flags.writeable else values.copy()  # F32 comes back as a view of the file
        tensor = torch.from_numpy(values.astype(np.float32, copy=False)).reshape(t.shape)
        if name in self._heads:
            tensor = interleaved_to_half_split(tensor, heads=self._heads[name])
        return tensor

    def describe(self) -> str:
        types = sorted({t.type_name for t in self.header.tensors.values()})
        return f"gguf ({self.header.metadata.get('general.architecture')}, {'/'.join(types)}, 1 file)"


def _expected_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    from jam_metaseq.models import build_model

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}


def claims(path: Path) -> bool:
    """A ``.gguf`` file."""
    return path.suffix == ".gguf" and not path.is_dir()


def open_gguf(path: Path, **_: object) -> GGUFReader:
    """The GGUF file at ``path``."""
    return GGUFReader(path)

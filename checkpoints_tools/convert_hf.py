"""HF transformers OPT <-> metaseq layout, so public OPT weights can be JAM parents (paper §3.1).

The two are the same function once mapped (``docs/CHECKPOINTS.md``; checked against
``OPTForCausalLM`` in ``tests/test_models_parity.py``): separate q/k/v projections are fused into
metaseq's ``qkv_proj`` in [K; V; Q] row order, ``model.decoder.final_layer_norm`` is metaseq's
``decoder.layer_norm``, ``lm_head`` is tied to the embedding. Key maps are data;
each direction has its inverse and a round-trip test.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from checkpoints_tools.readers import MetaseqReader, Reader, SafetensorsReader, TensorInfo, read_safetensors_index
from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.models.config import CrossConfig, DecoderConfig, ModelConfig

# metaseq name template -> HF name template (prefix "model." added when the file uses it).
# qkv is handled separately (one metaseq tensor <-> three HF tensors). None = dropped (tied).
KEY_MAP: dict[str, str | None] = {
    "decoder.embed_tokens.weight": "decoder.embed_tokens.weight",
    "decoder.embed_positions.weight": "decoder.embed_positions.weight",
    "decoder.layer_norm.weight": "decoder.final_layer_norm.weight",
    "decoder.layer_norm.bias": "decoder.final_layer_norm.bias",
    "decoder.layers.{}.self_attn.out_proj.weight": "decoder.layers.{}.self_attn.out_proj.weight",
    "decoder.layers.{}.self_attn.out_proj.bias": "decoder.layers.{}.self_attn.out_proj.bias",
    "decoder.layers.{}.self_attn_layer_norm.weight": "decoder.layers.{}.self_attn_layer_norm.weight",
    "decoder.layers.{}.self_attn_layer_norm.bias": "decoder.layers.{}.self_attn_layer_norm.bias",
    "decoder.layers.{}.fc1.weight": "decoder.layers.{}.fc1.weight",
    "decoder.layers.{}.fc1.bias": "decoder.layers.{}.fc1.bias",
    "decoder.layers.{}.fc2.weight": "decoder.layers.{}.fc2.weight",
    "decoder.layers.{}.fc2.bias": "decoder.layers.{}.fc2.bias",
    "decoder.layers.{}.final_layer_norm.weight": "decoder.layers.{}.final_layer_norm.weight",
    "decoder.layers.{}.final_layer_norm.bias": "decoder.layers.{}.final_layer_norm.bias",
    "decoder.output_projection.weight": None,  # = lm_head.weight, tied to the embedding
    "decoder.version": None,  # metaseq-only buffer
}
QKV = "decoder.layers.{}.self_attn.qkv_proj.{}"
HF_QKV = ("decoder.layers.{}.self_attn.k_proj.{}", "decoder.layers.{}.self_attn.v_proj.{}",
          "decoder.layers.{}.self_attn.q_proj.{}")  # metaseq row order: K, V, Q

_LAYER = re.compile(r"\.(\d+)\.")


def _template(name: str) -> tuple[str, str | None]:
    m = _LAYER.search(name)
    if not m:
        return name, None
    return name[: m.start()] + ".{}." + name[m.end():], m.group(1)


# ---- config ------------------------------------------------------------------------------------


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json") -> DecoderConfig:
    """An OPT ``config.json`` -> DecoderConfig (refuses OPT variants metaseq's decoder cannot express)."""
    if hf.get("model_type") != "opt":
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r}, only 'opt' is supported")
    if not hf.get("do_layer_norm_before", True):
        raise CheckpointError(f"{source}: post-LayerNorm OPT (do_layer_norm_before=false, e.g. opt-350m) "
                              "is not a metaseq pre-LN decoder")
    E = int(hf["hidden_size"])
    if int(hf.get("word_embed_proj_dim", E)) != E:
        raise CheckpointError(f"{source}: word_embed_proj_dim {hf['word_embed_proj_dim']} != hidden_size {E} "
                              "(project_in/out layers are not supported)")
    if hf.get("_remove_final_layer_norm", False):
        raise CheckpointError(f"{source}: _remove_final_layer_norm=true is not supported")
    act = hf.get("activation_function", "relu")
    if act not in ("relu", "gelu"):
        raise CheckpointError(f"{source}: activation {act!r} not supported (relu or gelu)")
    return DecoderConfig(
        vocab_size=int(hf["vocab_size"]), embed_dim=E, ffn_dim=int(hf["ffn_dim"]),
        layers=int(hf["num_hidden_layers"]), heads=int(hf["num_attention_heads"]),
        max_positions=int(hf["max_position_embeddings"]), padding_idx=int(hf.get("pad_token_id", 1) or 1),
        bias=bool(hf.get("enable_bias", True)), affine_ln=bool(hf.get("layer_norm_elementwise_affine", True)),
        activation=act, dropout=float(hf.get("dropout", 0.0)), attention_dropout=float(hf.get("attention_dropout", 0.0)),
        scale_embedding=False, init_std=float(hf.get("init_std", 0.02)),
    )


def hf_config(cfg: ModelConfig, *, dtype: torch.dtype | None) -> dict[str, Any]:
    """DecoderConfig -> an OPT ``config.json`` (inverse of ``config_from_hf``)."""
    if isinstance(cfg, CrossConfig):
        raise CheckpointError("JAM-Cross has no HF OPT equivalent; convert a decoder (parent, Uniform, Width)")
    if cfg.scale_embedding:
        raise CheckpointError("HF OPT does not scale embeddings; this model has scale_embedding=True")
    if cfg.padding_idx != 1:
        raise CheckpointError(f"HF OPT positions assume padding_idx 1, this model has {cfg.padding_idx}")
    if abs(cfg.ln_eps - 1e-5) > 1e-12:
        raise CheckpointError(f"HF OPT uses LayerNorm eps 1e-5, this model has {cfg.ln_eps}")
    return {
        "architectures": ["OPTForCausalLM"], "model_type": "opt",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim, "word_embed_proj_dim": cfg.embed_dim,
        "ffn_dim": cfg.ffn_dim, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
        "max_position_embeddings": cfg.max_positions, "activation_function": cfg.activation,
        "do_layer_norm_before": True, "enable_bias": cfg.bias, "layer_norm_elementwise_affine": cfg.affine_ln,
        "dropout": cfg.dropout, "attention_dropout": cfg.attention_dropout, "activation_dropout": 0.0,
        "layerdrop": 0.0, "init_std": cfg.init_std, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2,
        "tie_word_embeddings": True, "use_cache": True,
        "torch_dtype": str(dtype or torch.float32).replace("torch.", ""),
    }


# ---- HF -> metaseq (reading) -------------------------------------------------------------------


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
        unknown = [n for n in names if not _known_hf(n[len(p):] if n.startswith(p) else n)]
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


def _known_hf(n: str) -> bool:
    if n == "lm_head.weight":
        return True
    tpl, _ = _template(n)
    if tpl in {t for t in KEY_MAP.values() if t}:
        return True
    return any(tpl == t.format("{}", k) for t in HF_QKV for k in ("weight", "bias"))


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


# ---- metaseq -> HF (writing) -------------------------------------------------------------------


def to_hf_items(name: str, tensor: torch.Tensor, *, cfg: DecoderConfig) -> list[tuple[str, torch.Tensor]]:
    """One metaseq tensor -> its HF tensors (``model.`` prefix; qkv split into k, v, q)."""
    tpl, layer = _template(name)
    if tpl in ("decoder.layers.{}.self_attn.qkv_proj.weight", "decoder.layers.{}.self_attn.qkv_proj.bias"):
        kind = tpl.rsplit(".", 1)[1]
        k, v, q = torch.chunk(tensor, 3, dim=0)
        return [("model." + HF_QKV[0].format(layer, kind), k), ("model." + HF_QKV[1].format(layer, kind), v),
                ("model." + HF_QKV[2].format(layer, kind), q)]
    if tpl not in KEY_MAP:
        raise CheckpointError(f"tensor {name}: no HF OPT equivalent")
    hf = KEY_MAP[tpl]
    if hf is None:
        return []
    return [("model." + (hf.format(layer) if layer is not None else hf), tensor)]


def hf_shapes(shapes: Mapping[str, Sequence[int]], *, cfg: DecoderConfig) -> "OrderedDict[str, tuple[int, ...]]":
    out: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    for n, s in shapes.items():
        for hn, t in to_hf_items(n, torch.empty(tuple(s), device="meta"), cfg=cfg):
            out[hn] = tuple(t.shape)
    return out

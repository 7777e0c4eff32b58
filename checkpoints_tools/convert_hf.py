"""HF transformers OPT <-> metaseq layout, so public OPT weights can be JAM parents (paper §3.1).

The two are the same function once mapped (``docs/CHECKPOINTS.md``; checked against
``OPTForCausalLM`` in ``tests/test_models_parity.py``): separate q/k/v projections are fused into
metaseq's ``qkv_proj`` in [K; V; Q] row order, ``model.decoder.final_layer_norm`` is metaseq's
``decoder.layer_norm``, ``lm_head`` is tied to the embedding. Key maps are data;
each direction has its inverse and a round-trip test.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch

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


# ---- HF -> metaseq (reading: ``readers.HFOptReader`` applies these) ----------------------------


def is_hf_opt_name(n: str) -> bool:
    """An HF OPT tensor name (without the ``model.`` prefix) that has a metaseq equivalent."""
    if n == "lm_head.weight":
        return True
    tpl, _ = _template(n)
    if tpl in {t for t in KEY_MAP.values() if t}:
        return True
    return any(tpl == t.format("{}", k) for t in HF_QKV for k in ("weight", "bias"))



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

"""HF transformers OPT <-> metaseq, so public OPT weights can be JAM parents (paper §3.1).

The two are the same function once mapped (``docs/CHECKPOINTS.md``; checked against
``OPTForCausalLM`` in ``tests/test_models_parity.py``): OPT's separate q/k/v projections are
metaseq's fused ``qkv_proj`` in [K; V; Q] row order, ``model.decoder.final_layer_norm`` is
metaseq's ``decoder.layer_norm``, ``lm_head`` is tied to the embedding, and every other tensor of
a decoder layer has metaseq's name. Each direction has its inverse and a round-trip test.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from checkpoints_tools.hf.adapter import HFAdapter
from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.models import keys
from jam_metaseq.models.config import CrossConfig, DecoderConfig, ModelConfig

MODEL_TYPE = "opt"
_HF_LAYER = "decoder.layers.{}."


def _layer_name(name: str) -> str | tuple[str, ...]:
    """OPT's name of the decoder-layer tensor metaseq calls ``name``: the same, except the fused
    projection, whose rows are OPT's k, v and q projections in that order."""
    if name.startswith(f"{keys.QKV}."):
        kind = name[len(keys.QKV) + 1:]
        return tuple(f"{_HF_LAYER}self_attn.{p}_proj.{kind}" for p in ("k", "v", "q"))
    return _HF_LAYER + name


_NOT_OPT = ("separate_qkv", "gated")
"""Layer tensors of the Llama family's block (separate q/k/v, the MLP gate): not in OPT files, whose
q/k/v are the fused projection's rows."""

KEY_MAP: dict[str, Any] = {
    keys.VERSION: None,  # metaseq's constant buffer
    keys.EMBED: "decoder.embed_tokens.weight",
    keys.POSITIONS: "decoder.embed_positions.weight",
    **{f"{keys.LAYERS}.{{}}.{e.name}": _layer_name(e.name) for e in keys.LAYER
       if not set(e.needs) & set(_NOT_OPT)},
    keys.FINAL_NORM[0].name: "decoder.final_layer_norm.weight",
    keys.FINAL_NORM[1].name: "decoder.final_layer_norm.bias",
    keys.OUTPUT: None,  # lm_head.weight, the embedding
}
"""metaseq key (template) -> OPT name (template; a tuple: concatenated rows; None: not in OPT files)."""


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json") -> DecoderConfig:
    """An OPT ``config.json`` -> DecoderConfig (refuses OPT variants metaseq's decoder cannot express)."""
    if hf.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r}, only {MODEL_TYPE!r} is supported")
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
        "architectures": ["OPTForCausalLM"], "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim, "word_embed_proj_dim": cfg.embed_dim,
        "ffn_dim": cfg.ffn_dim, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
        "max_position_embeddings": cfg.max_positions, "activation_function": cfg.activation,
        "do_layer_norm_before": True, "enable_bias": cfg.bias, "layer_norm_elementwise_affine": cfg.affine_ln,
        "dropout": cfg.dropout, "attention_dropout": cfg.attention_dropout, "activation_dropout": 0.0,
        "layerdrop": 0.0, "init_std": cfg.init_std, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2,
        "tie_word_embeddings": True, "use_cache": True,
        "torch_dtype": str(dtype or torch.float32).replace("torch.", ""),
    }


ADAPTER = HFAdapter(
    model_type=MODEL_TYPE, display="OPT", prefix="model.", root="decoder.", layers="decoder.layers",
    key_map=KEY_MAP, tied={keys.OUTPUT: keys.EMBED}, hf_tied=("lm_head.weight",),
    markers=("model.decoder.", "decoder.layers.0.self_attn.q_proj"),
    config_from_hf=config_from_hf, hf_config=hf_config,
)

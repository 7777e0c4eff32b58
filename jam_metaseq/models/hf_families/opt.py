"""HF ``OPTForCausalLM`` <-> ours, so public OPT weights can be JAM parents (paper §3.1).

The two are the same function once mapped (``docs/CHECKPOINTS.md``; checked against
``OPTForCausalLM`` in ``tests/test_models_parity.py``): OPT's separate q/k/v projections are
metaseq's fused ``qkv_proj`` in [K; V; Q] row order, ``model.decoder.final_layer_norm`` is our
``decoder.layer_norm``, ``lm_head`` is tied to the embedding, and every other tensor of a decoder
layer has our name. Each direction has its inverse and a round-trip test.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .. import keys
from ..config import DecoderConfig
from .base import HF_OUTPUT, HFFamily, check_one_of

MODEL_TYPE = "opt"
_HF_LAYER = "model.decoder.layers.{}."


def _layer_name(name: str) -> str | tuple[str, ...]:
    """OPT's name of the decoder-layer tensor we call ``name``: the same, except the fused
    projection, whose rows are OPT's k, v and q projections in that order."""
    if name.startswith(f"{keys.QKV}."):
        kind = name[len(keys.QKV) + 1:]
        return tuple(f"{_HF_LAYER}self_attn.{p}_proj.{kind}" for p in ("k", "v", "q"))
    return _HF_LAYER + name


_NOT_OPT = ("separate_qkv", "gated")
"""Layer tensors of the Llama family's block (separate q/k/v, the MLP gate): not in OPT files, whose
q/k/v are the fused projection's rows."""

KEY_MAP: dict[str, Any] = {
    keys.VERSION: None,  # our constant buffer
    keys.EMBED: "model.decoder.embed_tokens.weight",
    keys.POSITIONS: "model.decoder.embed_positions.weight",
    **{f"{keys.LAYERS}.{{}}.{e.name}": _layer_name(e.name) for e in keys.LAYER
       if not set(e.needs) & set(_NOT_OPT)},
    keys.FINAL_NORM[0].name: "model.decoder.final_layer_norm.weight",
    keys.FINAL_NORM[1].name: "model.decoder.final_layer_norm.bias",
    keys.OUTPUT: HF_OUTPUT,  # always tied: the embedding
}
"""Our key (template) -> OPT name (template; a tuple: concatenated rows; None: not in OPT files)."""


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json", padding_idx: int | None = None
                   ) -> DecoderConfig:
    """An OPT ``config.json`` -> DecoderConfig (refuses OPT variants our decoder cannot express).
    OPT's learned positions start after its ``pad_token_id``: a different ``padding_idx`` is refused."""
    if hf.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r}, only {MODEL_TYPE!r} is supported")
    if not hf.get("do_layer_norm_before", True):
        raise ValueError(f"{source}: post-LayerNorm OPT (do_layer_norm_before=false, e.g. opt-350m) "
                         "is not a metaseq pre-LN decoder")
    E = int(hf["hidden_size"])
    if int(hf.get("word_embed_proj_dim", E)) != E:
        raise ValueError(f"{source}: word_embed_proj_dim {hf['word_embed_proj_dim']} != hidden_size {E} "
                         "(project_in/out layers are not supported)")
    if hf.get("_remove_final_layer_norm", False):
        raise ValueError(f"{source}: _remove_final_layer_norm=true is not supported")
    act = hf.get("activation_function", "relu")
    if act not in ("relu", "gelu"):
        raise ValueError(f"{source}: activation {act!r} not supported (relu or gelu)")
    pad = int(hf.get("pad_token_id", 1) or 1)
    if padding_idx is not None and padding_idx != pad:
        raise ValueError(f"{source}: OPT's positions start after pad_token_id {pad}; the vocabulary names "
                         f"pad {padding_idx}")
    return DecoderConfig(
        vocab_size=int(hf["vocab_size"]), embed_dim=E, ffn_dim=int(hf["ffn_dim"]),
        layers=int(hf["num_hidden_layers"]), heads=int(hf["num_attention_heads"]),
        max_positions=int(hf["max_position_embeddings"]), padding_idx=pad,
        bias=bool(hf.get("enable_bias", True)), affine_ln=bool(hf.get("layer_norm_elementwise_affine", True)),
        activation=act, dropout=float(hf.get("dropout", 0.0)), attention_dropout=float(hf.get("attention_dropout", 0.0)),
        scale_embedding=False, init_std=float(hf.get("init_std", 0.02)),
    )


def check(cfg: DecoderConfig) -> None:
    """``ValueError`` naming the field when ``OPTForCausalLM`` does not compute the model ``cfg``."""
    what = "HF OPTForCausalLM"
    check_one_of(cfg, what, norm=("layernorm",), positions=("learned",), mlp=("plain",), qkv=("fused",),
                 tie_embeddings=(True,), activation=("relu", "gelu"), scale_embedding=(False,), padding_idx=(1,))
    if abs(cfg.ln_eps - 1e-5) > 1e-12:
        raise ValueError(f"{what} has ln_eps=1e-05; this model has ln_eps={cfg.ln_eps}")


def hf_config(cfg: DecoderConfig, *, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """DecoderConfig -> an OPT ``config.json`` (inverse of ``config_from_hf``; ``check`` first)."""
    check(cfg)
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


FAMILY = HFFamily(
    model_type=MODEL_TYPE, architecture="OPTForCausalLM", display="OPT", key_map=KEY_MAP, prefix="model.",
    markers=("model.decoder.", "decoder.layers.0.self_attn.q_proj"),
    config_from_hf=config_from_hf, hf_config=hf_config, check=check, ties=lambda hf: True,
)

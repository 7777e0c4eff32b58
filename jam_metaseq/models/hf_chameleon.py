"""Hugging Face's Chameleon checkpoints <-> ours (issue 24): the decoder of
``ChameleonForConditionalGeneration`` (Chameleon-7B/30B, Anole-7B, Lumina-mGPT).

Chameleon's decoder is the Llama block (``hf_families``) plus per-head query/key LayerNorms and,
for the 30B model, norms after the sublayers, which ``DecoderConfig`` has as ``qk_norm`` and
``swin_norm``. So this family is the Llama key map plus four tensors per layer (``QK_NORM_MAP``), and the Llama config
translation plus three fields; both are delegated to ``hf_families`` (one home for the rotary, bias
and activation spellings) and only the difference is written here.

Layout facts (checked against ``transformers`` on random weights, ``tests/test_models_chameleon.py``):

- ``model.layers.{i}.self_attn.q_norm.{weight,bias}`` (H, D) and ``k_norm`` (G, D) are our
  ``self_attn.q_norm`` / ``self_attn.k_norm`` as they are (``keys.Q_NORM`` says how they split).
  HF's ``ChameleonLayerNorm`` normalises each head's D features (eps 1e-5, not ``rms_norm_eps``)
  and then applies that head's weight and bias; HF's converter permuted the rows of Meta's
  weights to the half-split rotary order together with q/k, so they load unpermuted.
- ``swin_norm``: ``input_layernorm`` / ``post_attention_layernorm`` are applied to the attention /
  MLP output; the tensors keep the names (our ``self_attn_layer_norm`` / ``final_layer_norm``).
- The head width is always E / H (no ``head_dim`` in the config), the output projection is never
  tied (``lm_head.weight`` is in every file).
- ``model.vqmodel.*`` is the image tokenizer (``ChameleonVQVAE``, encoder only: transformers'
  converter drops the VQ decoder): not a decoder tensor, read by
  ``jam_metaseq.image_tokenizer.hf_vqvae`` (``our_name`` returns None for it).
- HF's forward sets the logits of every image-code id (``vocabulary_map``'s ``IMGIMG*`` entries) to
  the dtype's minimum (the released Chameleon-7B does not draw images); ours are the decoder's
  logits, and which ids may be drawn is decoding's business (issue 24 item 5).
- ``vocabulary_map`` (token string -> id, all 65,536 entries) is vocabulary, not model: an HF
  config needs it to load, so ``hf_config`` takes it; the vocabulary manifest will carry it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from . import hf_families, keys
from .config import DecoderConfig
from .decoder import fresh_buffer

MODEL_TYPE = "chameleon"
ARCHITECTURE = "ChameleonForConditionalGeneration"
VQ_PREFIX = "model.vqmodel."
"""The image tokenizer's tensors in an HF Chameleon file (``image_tokenizer.hf_vqvae``)."""

_HF_LAYERS = "model.layers."
QK_NORM_MAP: dict[str, str] = {
    f"{keys.LAYERS}.{{}}.{ours}.{kind}": f"{_HF_LAYERS}{{}}.{ours}.{kind}"
    for ours in (keys.Q_NORM, keys.K_NORM) for kind in ("weight", "bias")
}
"""Our key template -> HF's for the per-head q/k norms (same names); every other tensor maps as in
``hf_families.KEY_MAP``."""

DEFAULTS: dict[str, Any] = {
    "vocab_size": 65536, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 4096, "initializer_range": 0.02,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_theta": 10000.0, "attention_bias": False,
    "attention_dropout": 0.0, "mlp_bias": False, "swin_norm": False,
}
"""``ChameleonConfig``'s defaults for the keys a ``config.json`` may leave out."""
_LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
               "pad_token_id", "tie_word_embeddings", "rope_parameters", "rope_theta", "rope_scaling",
               "attention_bias", "attention_dropout", "mlp_bias")
"""The keys a Chameleon ``config.json`` shares with Llama's, with Llama's meaning."""


# ---- tensor names --------------------------------------------------------------------------------
def hf_name(name: str, cfg: DecoderConfig) -> str | None:
    """Our decoder tensor ``name`` -> its HF name; None for the version buffer."""
    if keys.is_qk_norm(name) and name.startswith(f"{keys.LAYERS}."):
        return _HF_LAYERS + name[len(keys.LAYERS) + 1:]
    return hf_families.hf_name(name, cfg)


def our_name(name: str, cfg: DecoderConfig) -> str | None:
    """An HF tensor ``name`` -> ours; None for the image tokenizer's (``VQ_PREFIX``) and saved
    rotary frequencies."""
    if name.startswith(VQ_PREFIX):
        return None
    if keys.is_qk_norm(name) and name.startswith(_HF_LAYERS):
        return f"{keys.LAYERS}.{name[len(_HF_LAYERS):]}"
    return hf_families.our_name(name, cfg)


def to_hf_state(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """Our decoder's state dict -> HF's decoder tensors (no ``model.vqmodel.*``)."""
    return {n: v for k, v in state.items() if (n := hf_name(k, cfg)) is not None}


def from_hf_state(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """An HF Chameleon state dict -> our decoder's, complete for ``load_state_dict(strict=True)``
    (the image tokenizer's tensors left out)."""
    out: dict[str, torch.Tensor] = {keys.VERSION: fresh_buffer(keys.VERSION)}
    for k, v in state.items():
        if (n := our_name(k, cfg)) is not None:
            out[n] = v
    return {k: out[k] for k in keys.state_keys(cfg) if k in out}


# ---- configs -------------------------------------------------------------------------------------
def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json",
                   padding_idx: int | None = None) -> DecoderConfig:
    """An HF Chameleon ``config.json`` -> ``DecoderConfig`` (``padding_idx``: as in
    ``hf_families.config_from_hf``)."""
    if hf.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not {MODEL_TYPE!r}")
    d = {**DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    if d.get("head_dim") not in (None, int(d["hidden_size"]) // int(d["num_attention_heads"])):
        raise ValueError(f"{source}: head_dim {d['head_dim']} is not hidden_size / num_attention_heads "
                         "(HF Chameleon has no head width of its own)")
    llama = {"model_type": "llama", **{k: d[k] for k in _LLAMA_KEYS if k in d}}
    cfg = hf_families.config_from_hf(llama, source=source, padding_idx=padding_idx)
    return dataclasses.replace(cfg, qk_norm="layernorm_per_head", swin_norm=bool(d["swin_norm"]))


def hf_config(cfg: DecoderConfig, *, vocabulary_map: Mapping[str, int], vq_config: Mapping[str, Any] | None = None,
              dtype: torch.dtype | None = None) -> dict[str, Any]:
    """``DecoderConfig`` -> a Chameleon ``config.json`` (inverse of ``config_from_hf``).
    ``vocabulary_map``: token string -> id (``ChameleonModel`` reads its ``<image>`` and ``IMGIMG*``
    entries); ``vq_config``: the image tokenizer's (``image_tokenizer.hf_vqvae.hf_vq_config``;
    None: transformers' default)."""
    if cfg.qk_norm != "layernorm_per_head":
        raise ValueError(f"HF Chameleon normalises queries and keys per head; this model has qk_norm={cfg.qk_norm!r}")
    if cfg.head_dim * cfg.heads != cfg.embed_dim:
        raise ValueError(f"HF Chameleon's head width is embed_dim / heads; this model has {cfg.heads} heads of "
                         f"{cfg.head_dim} with embed_dim {cfg.embed_dim}")
    if cfg.tie_embeddings:
        raise ValueError("HF Chameleon's lm_head is its own tensor; this model ties it to the embedding")
    llama = hf_families.hf_config(dataclasses.replace(cfg, qk_norm="none", swin_norm=False), family="llama",
                                  dtype=dtype)
    out = {k: v for k, v in llama.items() if k != "head_dim"}
    out.update(architectures=[ARCHITECTURE], model_type=MODEL_TYPE, swin_norm=cfg.swin_norm, model_parallel_size=1,
               vocabulary_map=dict(vocabulary_map))
    if vq_config is not None:
        out["vq_config"] = dict(vq_config)
    return out

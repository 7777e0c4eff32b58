"""HF ``LlamaForCausalLM`` <-> ours (issue 23), and the block Qwen2 and Gemma share with it.

``LlamaForCausalLM``, ``Qwen2ForCausalLM`` and ``GemmaForCausalLM`` are one block with different
settings, as ``DecoderConfig`` has them, and one tensor layout: ``KEY_MAP`` is theirs, and each
family is a ``Spelling`` (what its ``config.json`` spells its own way: class, defaults, biases,
norm, embedding scale) turned into an ``HFFamily`` by ``family``. Round trips and parity with
``transformers``: ``tests/test_models_families.py``, ``tests/test_ckpt_families.py``.

Layout facts the map relies on (checked against ``transformers`` on random weights):

- q/k/v are separate in both (``keys.Q_PROJ`` says why we keep them apart), so every tensor maps
  to exactly one tensor: a reader or writer streams one tensor at a time, never concatenating.
- Rotary layout: HF's half-split ``rotate_half`` (dims i and i + D/2 of a head rotate together),
  which ``models.rotary.apply_rotary`` uses too, so q/k rows load as they are. Meta's original
  Llama checkpoints interleave pairs (2i, 2i + 1); HF's converter permutes them; we read HF's.
- HF gate_proj / up_proj / down_proj = our ``fc_gate`` / ``fc1`` / ``fc2``; input_layernorm /
  post_attention_layernorm / norm = ``self_attn_layer_norm`` / ``final_layer_norm`` /
  ``decoder.layer_norm``; o_proj = ``out_proj``.
- Gemma stores its RMSNorm weights as w in (1 + w) and scales the embedding by sqrt(E) rounded
  to the model's dtype: ``norm="rmsnorm_plus_one"``, ``embed_scale_in_dtype=True``; the stored
  values are the same numbers in both formats.
- ``padding_idx`` is ours (the id masked as padding): HF's ``pad_token_id`` when the file names
  one, else the caller's (an imported parent's vocabulary manifest decides: HF Llama names none).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .. import keys
from ..config import DecoderConfig, normalize_rope_scaling
from .base import HF_OUTPUT, HFFamily, check_one_of

_L = f"{keys.LAYERS}.{{}}"
KEY_MAP: dict[str, str | None] = {
    keys.VERSION: None,  # our constant buffer
    keys.EMBED: "model.embed_tokens.weight",
    **{f"{_L}.{ours}.{kind}": f"model.layers.{{}}.{hf}.{kind}"
       for ours, hf in ((keys.Q_PROJ, "self_attn.q_proj"), (keys.K_PROJ, "self_attn.k_proj"),
                        (keys.V_PROJ, "self_attn.v_proj"), ("self_attn.out_proj", "self_attn.o_proj"),
                        (keys.FC_GATE, "mlp.gate_proj"), (keys.FC1, "mlp.up_proj"), (keys.FC2, "mlp.down_proj"))
       for kind in ("weight", "bias")},
    f"{_L}.self_attn_layer_norm.weight": "model.layers.{}.input_layernorm.weight",
    f"{_L}.final_layer_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    keys.FINAL_NORM[0].name: "model.norm.weight",
    keys.OUTPUT: HF_OUTPUT,  # only when untied
}
"""Our key template -> HF's, for every tensor a Llama-family model of ours can have."""
HF_ONLY = ("model.layers.{}.self_attn.rotary_emb.inv_freq",)
"""HF tensors with no counterpart (older files saved the rotary frequencies): dropped on reading."""

HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
"""HF ``hidden_act`` -> ``DecoderConfig.activation`` (Gemma reads ``gelu`` as the tanh form: HF's rule)."""
ACTIVATIONS_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu"}


@dataclass(frozen=True)
class Spelling:
    """What one Llama-style family's ``config.json`` spells its own way."""

    model_type: str
    architecture: str
    display: str
    defaults: dict[str, Any] = field(default_factory=dict)
    """HF's defaults for keys a ``config.json`` may leave out (the family's config class's)."""
    biases: str = "llama"
    """How the file says which projections have biases: ``llama`` (``attention_bias`` for q/k/v/o,
    ``mlp_bias`` for the MLP), ``qwen2`` (q/k/v always, nothing else), ``gemma`` (``attention_bias``
    for q/k/v/o, MLP never)."""
    norm: str = "rmsnorm"
    scale_embedding: bool = False


SPELLING = Spelling("llama", "LlamaForCausalLM", "Llama", defaults={
    "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "rope_theta": 10000.0,
    "max_position_embeddings": 2048, "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02})


def _rope_from_hf(hf: Mapping[str, Any], sp: Spelling, *, source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (older files)."""
    params = hf.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{source}: rope_parameters per layer type are not supported")
    merged = {**(hf.get("rope_scaling") or {}), **params}
    theta = float(merged.get("rope_theta", hf.get("rope_theta", sp.defaults["rope_theta"])))
    partial = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if float(partial) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor {partial} is not supported (rotary on whole heads only)")
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind == "llama3":
        merged.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    try:
        return theta, normalize_rope_scaling({**merged, "rope_type": kind})
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _biases_from_hf(hf: Mapping[str, Any], sp: Spelling, *, source: str) -> tuple[bool, bool]:
    """(bias, qkv_bias): ``bias`` for o_proj and the MLP, ``qkv_bias`` for q/k/v."""
    if sp.biases == "qwen2":
        return False, True
    attn = bool(hf.get("attention_bias", sp.defaults.get("attention_bias", False)))
    mlp = bool(hf.get("mlp_bias", sp.defaults.get("mlp_bias", False))) if sp.biases == "llama" else False
    if attn != mlp:  # our ``bias`` covers o_proj and the MLP together
        raise ValueError(f"{source}: attention_bias={str(attn).lower()} with mlp_bias={str(mlp).lower()} is not "
                         "supported (biases on all projections or on none)" if sp.biases == "llama" else
                         f"{source}: attention_bias=true is not supported for {sp.model_type} (o_proj biased, "
                         "its MLP never)")
    return attn, attn


def config_from_hf(hf: Mapping[str, Any], *, sp: Spelling, source: str = "config.json",
                   padding_idx: int | None = None) -> DecoderConfig:
    """A Llama-style ``config.json`` of family ``sp`` -> ``DecoderConfig``. ``padding_idx``: the id
    masked as padding when the file names none (``pad_token_id``); one of the two is needed."""
    if hf.get("model_type") != sp.model_type:
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r}, not {sp.model_type!r}")
    d = {**sp.defaults, **{k: v for k, v in hf.items() if v is not None}}
    if d.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window=true is not supported (full attention only)")
    if any(t != "full_attention" for t in d.get("layer_types") or []):
        raise ValueError(f"{source}: layer_types other than full_attention are not supported")
    if d.get("use_bidirectional_attention"):
        raise ValueError(f"{source}: use_bidirectional_attention=true is not supported (a causal decoder)")
    act_name = d.get("hidden_activation") or d["hidden_act"]
    if sp.model_type == "gemma" and act_name == "gelu":
        act_name = "gelu_pytorch_tanh"  # HF's reading of Gemma's legacy "gelu" (transformers PR 29402)
    if act_name not in HF_ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act {act_name!r} is not supported ({', '.join(HF_ACTIVATIONS)})")
    theta, scaling = _rope_from_hf(hf, sp, source=source)
    bias, qkv_bias = _biases_from_hf(d, sp, source=source)
    pad = d.get("pad_token_id")
    if pad is not None and padding_idx is not None and int(pad) != int(padding_idx):
        raise ValueError(f"{source}: pad_token_id {pad}, but the vocabulary manifest names pad {padding_idx}")
    if pad is None:
        pad = padding_idx
    if pad is None:
        raise ValueError(f"{source}: pad_token_id is null; name the padding id (the vocabulary manifest's pad: "
                         "pass --vocab MANIFEST, or put vocab.json beside the checkpoint)")
    E, H = int(d["hidden_size"]), int(d["num_attention_heads"])
    head_dim = int(d.get("head_dim") or E // H)
    kv = int(d.get("num_key_value_heads") or H)
    return DecoderConfig(
        vocab_size=int(d["vocab_size"]), embed_dim=E, ffn_dim=int(d["intermediate_size"]),
        layers=int(d["num_hidden_layers"]), heads=H, kv_heads=None if kv == H else kv,
        attn_head_dim=None if head_dim * H == E else head_dim, max_positions=int(d["max_position_embeddings"]),
        padding_idx=int(pad), bias=bias, qkv_bias=None if qkv_bias == bias else qkv_bias,
        activation=HF_ACTIVATIONS[act_name], attention_dropout=float(d.get("attention_dropout", 0.0)),
        scale_embedding=sp.scale_embedding, embed_scale_in_dtype=sp.scale_embedding, ln_eps=float(d["rms_norm_eps"]),
        init_std=float(d["initializer_range"]), norm=sp.norm, positions="rotary", rope_theta=theta,
        rope_scaling=scaling, mlp="gated", qkv="separate", tie_embeddings=bool(d["tie_word_embeddings"]),
    )


def check(cfg: DecoderConfig, *, sp: Spelling) -> None:
    """``ValueError`` naming the field when HF's ``sp`` class does not compute the model ``cfg``."""
    what = f"HF {sp.architecture}"
    check_one_of(cfg, what, norm=(sp.norm,), positions=("rotary",), mlp=("gated",), qkv=("separate",),
                 affine_ln=(True,), qk_norm=("none",), swin_norm=(False,))
    if cfg.scale_embedding != sp.scale_embedding or (sp.scale_embedding and not cfg.embed_scale_in_dtype):
        raise ValueError(f"{what} {'scales' if sp.scale_embedding else 'does not scale'} the "
                         f"embedding by sqrt(E){' in the model dtype' if sp.scale_embedding else ''}; this model "
                         f"has scale_embedding={cfg.scale_embedding}, embed_scale_in_dtype={cfg.embed_scale_in_dtype}")
    if sp.biases == "qwen2" and (cfg.bias or not cfg.has_qkv_bias):
        raise ValueError(f"{what} has biases on q/k/v only; this model has bias={cfg.bias}, "
                         f"qkv_bias={cfg.has_qkv_bias}")
    if sp.biases != "qwen2" and cfg.has_qkv_bias != cfg.bias:
        raise ValueError(f"{what} biases q/k/v and o_proj alike; this model has "
                         f"qkv_bias={cfg.has_qkv_bias}, bias={cfg.bias}")
    if sp.biases == "gemma" and cfg.bias:
        raise ValueError(f"{what} has no MLP biases; this model has bias=True")
    if sp.model_type == "gemma" and cfg.activation == "gelu":
        raise ValueError(f"{what} reads hidden_act 'gelu' as the tanh form; this model has the exact gelu")


def hf_config(cfg: DecoderConfig, *, sp: Spelling, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """``DecoderConfig`` -> family ``sp``'s ``config.json`` (inverse of ``config_from_hf``; ``check``
    first). Written in both spellings of the rotary settings (transformers 5's ``rope_parameters``
    and the older ``rope_theta`` / ``rope_scaling``) so either version loads it. Dropout is a
    training setting HF's classes do not have: left out."""
    check(cfg, sp=sp)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope.update(cfg.rope_scaling)
    out: dict[str, Any] = {
        "architectures": [sp.architecture], "model_type": sp.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": ACTIVATIONS_HF[cfg.activation],
        "max_position_embeddings": cfg.max_positions, "rms_norm_eps": cfg.ln_eps,
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": cfg.attention_dropout, "pad_token_id": cfg.padding_idx,
        "rope_parameters": rope, "rope_theta": cfg.rope_theta,  # copies: HF edits these dicts in place
        "rope_scaling": None if cfg.rope_scaling is None else dict(cfg.rope_scaling),
        "use_cache": True, "torch_dtype": str(dtype or torch.float32).replace("torch.", ""),
    }
    if sp.biases == "llama":
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    elif sp.biases == "gemma":
        out.update(attention_bias=cfg.bias, hidden_activation=out["hidden_act"])
    else:
        out.update(use_sliding_window=False)
    return out


def family(sp: Spelling) -> HFFamily:
    """The ``HFFamily`` of a Llama-style family: this file's key map, ``sp``'s config spellings."""
    return HFFamily(
        model_type=sp.model_type, architecture=sp.architecture, display=sp.display, key_map=KEY_MAP,
        prefix="model.", markers=("model.layers.0.self_attn.q_proj", "layers.0.self_attn.q_proj"),
        config_from_hf=functools.partial(config_from_hf, sp=sp), hf_config=functools.partial(hf_config, sp=sp),
        check=functools.partial(check, sp=sp),
        ties=lambda hf: bool(hf.get("tie_word_embeddings", sp.defaults["tie_word_embeddings"])),
        hf_only=HF_ONLY,
    )


FAMILY = family(SPELLING)

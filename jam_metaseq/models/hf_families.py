"""Hugging Face's Llama-family checkpoints <-> ours, as data (issue 23): ``LlamaForCausalLM``,
``Qwen2ForCausalLM`` and ``GemmaForCausalLM``.

The three HF classes are one block with different settings, as ``DecoderConfig`` has them, and
share one tensor layout, so there is one key map (``KEY_MAP``: our template -> HF template, ``{}``
the layer index, None = not in the other format) and per family only what its ``config.json``
spells differently (``FAMILIES``: its class, its defaults for keys a file may leave out, its bias
and activation spelling). Each direction has its inverse: ``hf_name`` / ``our_name`` for tensor
names, ``config_from_hf`` / ``hf_config`` for configs (round trips in
``tests/test_models_families.py``). Where our config cannot be written as a family's HF config,
or an HF config uses what our decoder does not compute, the error names the field.

Layout facts the map relies on (checked against ``transformers`` on random weights):

- q/k/v are separate in both (``keys.Q_PROJ`` says why we keep them apart), so every tensor maps
  to exactly one tensor: a reader or writer streams one tensor at a time, never concatenating.
- Rotary layout: HF's half-split ``rotate_half`` (dims i and i + D/2 of a head rotate together),
  which ``models.decoder.apply_rotary`` uses too, so q/k rows load as they are. Meta's original
  Llama checkpoints interleave pairs (2i, 2i + 1); HF's converter permutes them; we read HF's.
- HF gate_proj / up_proj / down_proj = our ``fc_gate`` / ``fc1`` / ``fc2``; input_layernorm /
  post_attention_layernorm / norm = ``self_attn_layer_norm`` / ``final_layer_norm`` /
  ``decoder.layer_norm``; o_proj = ``out_proj``.
- A tied ``lm_head.weight`` is the embedding: HF files leave it out (``save_pretrained``), our
  state dicts list it under ``decoder.output_projection.weight``; untied, it maps one to one.
- Gemma stores its RMSNorm weights as w in (1 + w) and scales the embedding by sqrt(E) rounded
  to the model's dtype: ``norm="rmsnorm_plus_one"``, ``embed_scale_in_dtype=True``; the stored
  values are the same numbers in both formats.
- ``padding_idx`` is ours (the id masked as padding): HF's ``pad_token_id`` when the file names
  one, else the caller's (an imported parent's vocabulary manifest decides).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from . import keys
from .config import DecoderConfig, normalize_rope_scaling
from .decoder import fresh_buffer

_L = f"{keys.LAYERS}.{{}}"
KEY_MAP: dict[str, str | None] = {
    keys.VERSION: None,  # metaseq's constant buffer
    keys.EMBED: "model.embed_tokens.weight",
    **{f"{_L}.{ours}.{kind}": f"model.layers.{{}}.{hf}.{kind}"
       for ours, hf in ((keys.Q_PROJ, "self_attn.q_proj"), (keys.K_PROJ, "self_attn.k_proj"),
                        (keys.V_PROJ, "self_attn.v_proj"), ("self_attn.out_proj", "self_attn.o_proj"),
                        (keys.FC_GATE, "mlp.gate_proj"), (keys.FC1, "mlp.up_proj"), (keys.FC2, "mlp.down_proj"))
       for kind in ("weight", "bias")},
    f"{_L}.self_attn_layer_norm.weight": "model.layers.{}.input_layernorm.weight",
    f"{_L}.final_layer_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    keys.FINAL_NORM[0].name: "model.norm.weight",
    keys.OUTPUT: "lm_head.weight",  # only when untied (``hf_name``)
}
"""Our key template -> HF's, for every tensor a Llama-family model of ours can have."""
HF_ONLY: dict[str, None] = {"model.layers.{}.self_attn.rotary_emb.inv_freq": None}
"""HF tensors with no counterpart (older files saved the rotary frequencies): dropped on reading."""
_FROM_HF: dict[str, str] = {hf: ours for ours, hf in KEY_MAP.items() if hf is not None}

HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
"""HF ``hidden_act`` -> ``DecoderConfig.activation`` (Gemma reads ``gelu`` as the tanh form: HF's rule)."""
ACTIVATIONS_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu"}


@dataclass(frozen=True)
class Family:
    """What one HF family's ``config.json`` spells its own way."""

    model_type: str
    architecture: str
    """The ``*ForCausalLM`` class ``architectures`` names."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """HF's defaults for keys a ``config.json`` may leave out (the family's config class's)."""
    biases: str = "llama"
    """How the file says which projections have biases: ``llama`` (``attention_bias`` for q/k/v/o,
    ``mlp_bias`` for the MLP), ``qwen2`` (q/k/v always, nothing else), ``gemma`` (``attention_bias``
    for q/k/v/o, MLP never)."""
    norm: str = "rmsnorm"
    scale_embedding: bool = False


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaForCausalLM", defaults={
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "rope_theta": 10000.0,
        "max_position_embeddings": 2048, "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02}),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", biases="qwen2", defaults={
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "rope_theta": 10000.0,
        "max_position_embeddings": 32768, "initializer_range": 0.02}),
    "gemma": Family("gemma", "GemmaForCausalLM", biases="gemma", norm="rmsnorm_plus_one", scale_embedding=True,
                    defaults={"rms_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": True,
                              "rope_theta": 10000.0, "max_position_embeddings": 8192, "head_dim": 256,
                              "attention_bias": False, "initializer_range": 0.02, "pad_token_id": 0}),
}
"""The HF families we read and write, by ``model_type`` (OPT: ``checkpoints_tools.convert_hf``)."""

_LAYER = re.compile(r"\.(\d+)\.")


def _template(name: str) -> tuple[str, str | None]:
    m = _LAYER.search(name)
    if not m:
        return name, None
    return name[: m.start()] + ".{}." + name[m.end():], m.group(1)


# ---- tensor names --------------------------------------------------------------------------------
def hf_name(name: str, cfg: DecoderConfig) -> str | None:
    """Our tensor ``name`` -> its HF name; None for what an HF file does not hold (the version
    buffer, a tied output projection)."""
    tpl, layer = _template(name)
    if tpl not in KEY_MAP:
        raise ValueError(f"tensor {name}: no counterpart in the HF Llama-family layout")
    if tpl == keys.OUTPUT and cfg.tie_embeddings:
        return None
    hf = KEY_MAP[tpl]
    return None if hf is None else hf.format(layer)


def our_name(name: str, cfg: DecoderConfig) -> str | None:
    """An HF tensor ``name`` -> ours; None for what we do not keep (a tied ``lm_head.weight``,
    saved rotary frequencies)."""
    tpl, layer = _template(name)
    if tpl in HF_ONLY or (tpl == KEY_MAP[keys.OUTPUT] and cfg.tie_embeddings):
        return None
    if tpl not in _FROM_HF:
        raise ValueError(f"tensor {name}: not a tensor of an HF Llama/Qwen2/Gemma model")
    ours = _FROM_HF[tpl]
    return ours.format(layer) if layer is not None else ours


def to_hf_state(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """Our whole state dict -> HF's (what ``save_pretrained`` writes: no tied ``lm_head``). For
    small models and tests; readers and writers stream ``hf_name`` tensor by tensor."""
    out = {}
    for k, v in state.items():
        n = hf_name(k, cfg)
        if n is not None:
            out[n] = v
    return out


def from_hf_state(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """An HF state dict -> ours, complete for ``load_state_dict(strict=True)`` (the version buffer
    added, a tied output projection = the embedding)."""
    out: dict[str, torch.Tensor] = {keys.VERSION: fresh_buffer(keys.VERSION)}
    for k, v in state.items():
        n = our_name(k, cfg)
        if n is not None:
            out[n] = v
    if cfg.tie_embeddings:
        out[keys.OUTPUT] = out[keys.EMBED]
    return {k: out[k] for k in keys.state_keys(cfg) if k in out}  # state-dict order


# ---- configs -------------------------------------------------------------------------------------
def family_of(hf: Mapping[str, Any], *, source: str = "config.json") -> Family:
    """The family of an HF ``config.json`` (by ``model_type``)."""
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise ValueError(f"{source}: model_type {kind!r} is not a Llama-family model we read "
                         f"({', '.join(FAMILIES)}; OPT through convert_hf)")
    return FAMILIES[kind]


def _rope_from_hf(hf: Mapping[str, Any], fam: Family, *, source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (older files)."""
    params = hf.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{source}: rope_parameters per layer type are not supported")
    merged = {**(hf.get("rope_scaling") or {}), **params}
    theta = float(merged.get("rope_theta", hf.get("rope_theta", fam.defaults["rope_theta"])))
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


def _biases_from_hf(hf: Mapping[str, Any], fam: Family, *, source: str) -> tuple[bool, bool]:
    """(bias, qkv_bias): ``bias`` for o_proj and the MLP, ``qkv_bias`` for q/k/v."""
    if fam.biases == "qwen2":
        return False, True
    attn = bool(hf.get("attention_bias", fam.defaults.get("attention_bias", False)))
    mlp = bool(hf.get("mlp_bias", fam.defaults.get("mlp_bias", False))) if fam.biases == "llama" else False
    if attn != mlp:  # our ``bias`` covers o_proj and the MLP together
        raise ValueError(f"{source}: attention_bias={str(attn).lower()} with mlp_bias={str(mlp).lower()} is not "
                         "supported (biases on all projections or on none)" if fam.biases == "llama" else
                         f"{source}: attention_bias=true is not supported for {fam.model_type} (o_proj biased, "
                         "its MLP never)")
    return attn, attn


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json",
                   padding_idx: int | None = None) -> DecoderConfig:
    """An HF Llama / Qwen2 / Gemma ``config.json`` -> ``DecoderConfig``. ``padding_idx``: the id
    masked as padding (default: the file's ``pad_token_id``; one of the two is needed)."""
    fam = family_of(hf, source=source)
    d = {**fam.defaults, **{k: v for k, v in hf.items() if v is not None}}
    if d.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window=true is not supported (full attention only)")
    if any(t != "full_attention" for t in d.get("layer_types") or []):
        raise ValueError(f"{source}: layer_types other than full_attention are not supported")
    if d.get("use_bidirectional_attention"):
        raise ValueError(f"{source}: use_bidirectional_attention=true is not supported (a causal decoder)")
    act_name = d.get("hidden_activation") or d["hidden_act"]
    if fam.model_type == "gemma" and act_name == "gelu":
        act_name = "gelu_pytorch_tanh"  # HF's reading of Gemma's legacy "gelu" (transformers PR 29402)
    if act_name not in HF_ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act {act_name!r} is not supported ({', '.join(HF_ACTIVATIONS)})")
    theta, scaling = _rope_from_hf(hf, fam, source=source)
    bias, qkv_bias = _biases_from_hf(d, fam, source=source)
    if padding_idx is None:
        padding_idx = d.get("pad_token_id")
    if padding_idx is None:
        raise ValueError(f"{source}: pad_token_id is null; name the padding id (the vocabulary manifest's pad)")
    E, H = int(d["hidden_size"]), int(d["num_attention_heads"])
    head_dim = int(d.get("head_dim") or E // H)
    kv = int(d.get("num_key_value_heads") or H)
    return DecoderConfig(
        vocab_size=int(d["vocab_size"]), embed_dim=E, ffn_dim=int(d["intermediate_size"]),
        layers=int(d["num_hidden_layers"]), heads=H, kv_heads=None if kv == H else kv,
        attn_head_dim=None if head_dim * H == E else head_dim, max_positions=int(d["max_position_embeddings"]),
        padding_idx=int(padding_idx), bias=bias, qkv_bias=None if qkv_bias == bias else qkv_bias,
        activation=HF_ACTIVATIONS[act_name], attention_dropout=float(d.get("attention_dropout", 0.0)),
        scale_embedding=fam.scale_embedding, embed_scale_in_dtype=fam.scale_embedding, ln_eps=float(d["rms_norm_eps"]),
        init_std=float(d["initializer_range"]), norm=fam.norm, positions="rotary", rope_theta=theta,
        rope_scaling=scaling, mlp="gated", qkv="separate", tie_embeddings=bool(d["tie_word_embeddings"]),
    )


def family_for(cfg: DecoderConfig) -> Family:
    """The HF family whose class computes the model ``cfg`` (a JAM-Uniform or JAM-Width model of
    Llama-family parents is a plain model of their family), or an error naming the field."""
    for name, ok in (("norm", ("rmsnorm", "rmsnorm_plus_one")), ("positions", ("rotary",)), ("mlp", ("gated",)),
                     ("qkv", ("separate",))):
        if getattr(cfg, name) not in ok:
            raise ValueError(f"no HF Llama-family class computes this model ({name}={getattr(cfg, name)!r}); "
                             "an OPT-family model converts through convert_hf")
    if cfg.qk_norm != "none" or cfg.swin_norm:
        raise ValueError(f"no HF Llama-family class computes this model (qk_norm={cfg.qk_norm!r}, "
                         f"swin_norm={cfg.swin_norm}): a Chameleon model converts through hf_chameleon")
    if cfg.norm == "rmsnorm_plus_one":
        return FAMILIES["gemma"]
    if cfg.has_qkv_bias and not cfg.bias:
        return FAMILIES["qwen2"]
    return FAMILIES["llama"]


def hf_config(cfg: DecoderConfig, *, family: str | None = None, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """``DecoderConfig`` -> the family's ``config.json`` (inverse of ``config_from_hf``; ``family``:
    default ``family_for(cfg)``). Written in both spellings of the rotary settings (transformers 5's
    ``rope_parameters`` and the older ``rope_theta`` / ``rope_scaling``) so either version loads it.
    Dropout is a training setting HF's classes do not have: left out."""
    fam = FAMILIES[family] if family is not None else family_for(cfg)
    want = family_for(cfg)
    if want.model_type != fam.model_type:
        raise ValueError(f"this model is a {want.model_type} model, not {fam.model_type} "
                         f"(norm={cfg.norm!r}, bias={cfg.bias}, qkv_bias={cfg.has_qkv_bias})")
    if not cfg.affine_ln:
        raise ValueError("HF Llama-family norms have weights; this model has affine_ln=False")
    if cfg.scale_embedding != fam.scale_embedding or (fam.scale_embedding and not cfg.embed_scale_in_dtype):
        raise ValueError(f"HF {fam.model_type} {'scales' if fam.scale_embedding else 'does not scale'} the "
                         f"embedding by sqrt(E){' in the model dtype' if fam.scale_embedding else ''}; this model "
                         f"has scale_embedding={cfg.scale_embedding}, embed_scale_in_dtype={cfg.embed_scale_in_dtype}")
    if fam.biases == "qwen2" and (cfg.bias or not cfg.has_qkv_bias):
        raise ValueError(f"HF qwen2 has biases on q/k/v only; this model has bias={cfg.bias}, "
                         f"qkv_bias={cfg.has_qkv_bias}")
    if fam.biases != "qwen2" and cfg.has_qkv_bias != cfg.bias:
        raise ValueError(f"HF {fam.model_type} biases q/k/v and o_proj alike; this model has "
                         f"qkv_bias={cfg.has_qkv_bias}, bias={cfg.bias}")
    if fam.biases == "gemma" and cfg.bias:
        raise ValueError("HF gemma has no MLP biases; this model has bias=True")
    if fam.model_type == "gemma" and cfg.activation == "gelu":
        raise ValueError("HF gemma reads hidden_act 'gelu' as the tanh form; this model has the exact gelu")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope.update(cfg.rope_scaling)
    out: dict[str, Any] = {
        "architectures": [fam.architecture], "model_type": fam.model_type,
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
    if fam.biases == "llama":
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    elif fam.biases == "gemma":
        out.update(attention_bias=cfg.bias, hidden_activation=out["hidden_act"])
    else:
        out.update(use_sliding_window=False)
    return out

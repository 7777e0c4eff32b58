"""Shared fixtures for the core-model tests (issue 2): tiny configs, random weights, and the
HF ``OPTForCausalLM`` -> metaseq key map used by the parity tests and the forward benchmark.

The key map is data: ``{hf_template: metaseq_template}``, ``{}`` = layer index,
``None`` = drop (tied or fused elsewhere). q/k/v are fused separately because metaseq stacks them
as [K; V; Q] in one ``qkv_proj`` (docs/CHECKPOINTS.md, "qkv order").
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from jam_metaseq.models import DecoderConfig, preset

# HF OPT key template -> metaseq key template; None = not copied (tied lm_head, fused q/k/v).
HF_TO_METASEQ: dict[str, str | None] = {
    "model.decoder.embed_tokens.weight": "decoder.embed_tokens.weight",
    "model.decoder.embed_positions.weight": "decoder.embed_positions.weight",
    "model.decoder.final_layer_norm.weight": "decoder.layer_norm.weight",
    "model.decoder.final_layer_norm.bias": "decoder.layer_norm.bias",
    "model.decoder.layers.{}.self_attn.out_proj.weight": "decoder.layers.{}.self_attn.out_proj.weight",
    "model.decoder.layers.{}.self_attn.out_proj.bias": "decoder.layers.{}.self_attn.out_proj.bias",
    "model.decoder.layers.{}.self_attn_layer_norm.weight": "decoder.layers.{}.self_attn_layer_norm.weight",
    "model.decoder.layers.{}.self_attn_layer_norm.bias": "decoder.layers.{}.self_attn_layer_norm.bias",
    "model.decoder.layers.{}.fc1.weight": "decoder.layers.{}.fc1.weight",
    "model.decoder.layers.{}.fc1.bias": "decoder.layers.{}.fc1.bias",
    "model.decoder.layers.{}.fc2.weight": "decoder.layers.{}.fc2.weight",
    "model.decoder.layers.{}.fc2.bias": "decoder.layers.{}.fc2.bias",
    "model.decoder.layers.{}.final_layer_norm.weight": "decoder.layers.{}.final_layer_norm.weight",
    "model.decoder.layers.{}.final_layer_norm.bias": "decoder.layers.{}.final_layer_norm.bias",
    "model.decoder.layers.{}.self_attn.q_proj.weight": None,
    "model.decoder.layers.{}.self_attn.k_proj.weight": None,
    "model.decoder.layers.{}.self_attn.v_proj.weight": None,
    "model.decoder.layers.{}.self_attn.q_proj.bias": None,
    "model.decoder.layers.{}.self_attn.k_proj.bias": None,
    "model.decoder.layers.{}.self_attn.v_proj.bias": None,
    "lm_head.weight": None,
}
QKV_HF = "model.decoder.layers.{}.self_attn.{}_proj.{}"
QKV_METASEQ = "decoder.layers.{}.self_attn.qkv_proj.{}"
METASEQ_QKV_ORDER = ("k", "v", "q")
_LAYER = re.compile(r"\.(\d+)\.")


def tiny_cfg(**overrides) -> DecoderConfig:
    """The ``tiny`` preset (E=32, F=64, 2 layers, 4 heads, vocab 128) with fields overridden."""
    return preset("tiny", **overrides)


def randomize_(model: nn.Module, *, seed: int, std: float = 0.1) -> nn.Module:
    """Every parameter random (LayerNorm weights around 1), so that no term is trivially zero/one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return model


def hf_opt_config(cfg: DecoderConfig):
    """The HF ``OPTConfig`` describing the same function as ``cfg`` (needs scale_embedding=False)."""
    from transformers import OPTConfig

    if cfg.scale_embedding:
        raise ValueError("HF OPT does not scale embeddings: use scale_embedding=False")
    return OPTConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, ffn_dim=cfg.ffn_dim,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions, word_embed_proj_dim=cfg.embed_dim,
        do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0, layerdrop=0.0,
        activation_function=cfg.activation, enable_bias=cfg.bias,
        layer_norm_elementwise_affine=cfg.affine_ln, pad_token_id=cfg.padding_idx,
        bos_token_id=0, eos_token_id=2, tie_word_embeddings=True,
    )


def make_hf_opt(cfg: DecoderConfig, *, seed: int | None = 0, dtype: torch.dtype = torch.float32):
    """HF ``OPTForCausalLM`` (SDPA attention) of the same shape; random weights when ``seed`` is set."""
    from transformers import OPTForCausalLM

    model = OPTForCausalLM._from_config(hf_opt_config(cfg), attn_implementation="sdpa", torch_dtype=dtype)
    if seed is not None:
        randomize_(model, seed=seed)
    return model.eval()


def hf_to_metaseq(
    hf_state: dict[str, torch.Tensor], *, layers: int, qkv_order: tuple[str, str, str] = METASEQ_QKV_ORDER
) -> dict[str, torch.Tensor]:
    """HF OPT state dict -> metaseq ``model`` dict via ``HF_TO_METASEQ``; q/k/v stacked in ``qkv_order``."""
    out: dict[str, torch.Tensor] = {"decoder.version": torch.tensor([3.0])}
    for key, value in hf_state.items():
        m = _LAYER.search(key)
        template = _LAYER.sub(".{}.", key, count=1) if m else key
        if template not in HF_TO_METASEQ:
            raise KeyError(f"{key}: no entry in HF_TO_METASEQ")
        target = HF_TO_METASEQ[template]
        if target is not None:
            out[target.format(m.group(1)) if m else target] = value
    out["decoder.output_projection.weight"] = out["decoder.embed_tokens.weight"]
    for i in range(layers):
        for kind in ("weight", "bias"):
            parts = [QKV_HF.format(i, name, kind) for name in qkv_order]
            if all(p in hf_state for p in parts):
                out[QKV_METASEQ.format(i, kind)] = torch.cat([hf_state[p] for p in parts], dim=0)
    return out


def random_tokens(
    batch: int, length: int, *, low: int, high: int, seed: int, avoid: tuple[int, ...] = (0, 1, 2, 3)
) -> torch.Tensor:
    """(B, T) ids uniform in [low, high) with the dictionary specials (bos/pad/eos/unk) shifted out."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(low, high, (batch, length), generator=g)
    for a in avoid:
        tokens[tokens == a] = max(4, low)
    return tokens


def left_pad(rows: list[torch.Tensor], *, padding_idx: int) -> torch.Tensor:
    """Stack 1-D rows of different lengths into (B, T_max), padded on the left with ``padding_idx``."""
    width = max(int(r.numel()) for r in rows)
    out = torch.full((len(rows), width), padding_idx, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, width - r.numel():] = r
    return out


def with_cfg(cfg: DecoderConfig, **overrides) -> DecoderConfig:
    return dataclasses.replace(cfg, **overrides)


def pre_norm_hidden(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A parent's hidden state entering its final norm: (B, T, E)."""
    seen = []
    h = model.decoder.layer_norm.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        h.remove()
    return seen[0]

"""Tiny random HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``GemmaForCausalLM`` models built
from HF's own config classes and parameter names (the independent side of the family tests:
``test_models_families.py``, ``test_ckpt_families.py``, ``test_fusion_families.py``), and our model
of any HF model (``ours_from``, also for Chameleon's)."""

from __future__ import annotations

import torch

V = 128

_SHAPE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              pad_token_id=1, initializer_range=0.02)
# HF configs written from HF's own parameter names (the independent side of the test).
CASES = {
    "llama": ("Llama", dict(_SHAPE, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "llama-llama3-rope": ("Llama", dict(_SHAPE, num_key_value_heads=2, max_position_embeddings=128, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),  # head dim 8: one frequency kept, one scaled, one smoothed
    "llama-linear-rope-biases": ("Llama", dict(_SHAPE, max_position_embeddings=64, attention_bias=True, mlp_bias=True,
                                               tie_word_embeddings=True,
                                               rope_parameters={"rope_type": "linear", "rope_theta": 500.0,
                                                                "factor": 2.0})),
    "qwen2": ("Qwen2", dict(_SHAPE, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                             tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "gemma": ("Gemma", dict(_SHAPE, num_key_value_heads=1, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
                             hidden_act="gelu_pytorch_tanh",
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}
MAIN = ["llama", "qwen2", "gemma"]
"""The three families' tiny shapes: ``config_from_hf`` of each is our ``{family}_tiny`` preset."""


def hf_model(case: str, *, seed: int = 0, **over):
    """HF ``*ForCausalLM`` (SDPA attention) of ``case`` with random weights (norm scales near 1);
    ``over``: config entries replaced."""
    prefix, kw = CASES[case]
    import transformers

    config = getattr(transformers, f"{prefix}Config")(**{**kw, **over})
    model = getattr(transformers, f"{prefix}ForCausalLM")._from_config(config, attn_implementation="sdpa")
    return randomize_hf(model, seed=seed, plus_one=prefix == "Gemma").eval()


def randomize_hf(model, *, seed: int, plus_one: bool):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(noise + (1.0 if "norm" in name and not plus_one else 0.0))  # Gemma scales by 1 + w
    return model


def ours_from(hf) -> tuple[torch.nn.Module, object]:
    """Our model of the HF model ``hf`` (any family of ``hf_families``), loaded strictly with its weights."""
    from jam_metaseq.models import build_model, hf_families

    cfg = hf_families.config_from_hf(hf.config.to_dict())
    model = build_model(cfg).eval()
    model.load_state_dict(hf_families.from_hf_state(hf.state_dict(), cfg), strict=True)
    return model, cfg

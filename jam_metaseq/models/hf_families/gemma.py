"""HF ``GemmaForCausalLM`` <-> ours (issue 23): the Llama block (``llama.KEY_MAP``) with Gemma's
norm, (1 + w) * x / rms(x) with w stored (``norm="rmsnorm_plus_one"``), the embedding scaled by
sqrt(E) rounded to the model's dtype (``embed_scale_in_dtype``), a tanh-GELU gate, no MLP biases,
a tied head and a head width of its own (Gemma-7B: 16 heads x 256 > 3,072)."""

from __future__ import annotations

from .llama import Spelling, family

SPELLING = Spelling("gemma", "GemmaForCausalLM", "Gemma", biases="gemma", norm="rmsnorm_plus_one",
                    scale_embedding=True, defaults={
                        "rms_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": True,
                        "rope_theta": 10000.0, "max_position_embeddings": 8192, "head_dim": 256,
                        "attention_bias": False, "initializer_range": 0.02, "pad_token_id": 0})

FAMILY = family(SPELLING)

"""HF ``Qwen2ForCausalLM`` <-> ours (issue 23): the Llama block (``llama.KEY_MAP``) with biases on
q/k/v only and Qwen2's ``config.json`` defaults. Sliding-window attention is refused by name
(``use_sliding_window``); every released Qwen2 checkpoint leaves it off."""

from __future__ import annotations

from .llama import Spelling, family

SPELLING = Spelling("qwen2", "Qwen2ForCausalLM", "Qwen2", biases="qwen2", defaults={
    "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "rope_theta": 10000.0,
    "max_position_embeddings": 32768, "initializer_range": 0.02})

FAMILY = family(SPELLING)

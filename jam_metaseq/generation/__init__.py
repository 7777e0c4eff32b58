"""Mixed-modal generation (paper §3.1 "Decoding Strategies", Eq. 6).

Text until ``<break>``, exactly N image codes with classifier-free guidance, a forced closing
``<break>``, text until ``<eos>``; prefill + KV cache for every architecture; seeded per-row
sampling (temperature, top-p, top-k, repetition penalty). Modules:

- ``sampling``: ``SamplingConfig``, ``sample``, counter-based ``row_uniform``
- ``state``: ``MixedModalRules``, ``MixedModalState`` (per-row modality state on token ids)
- ``cfg``: ``unconditional_prompt``, ``blend`` (Eq. 6)
- ``step``: ``decode_step`` (the one decode step of every mode: forward, ``choose_tokens``, state
  advance, feed) over ``DecodeBuffers``
- ``engine``: ``GenerationConfig``, ``Engine`` (setup_caches / prefill / decode_one_token /
  decode_n_tokens / generate); ``static``: the fixed-shape loop and its CUDA graphs
- ``conversation``: ``Conversation``, a chat whose KV cache grows turn by turn (CFG's unconditional
  row: the history with the current user turn's text masked); ``chat`` / ``chat_cli``: it behind the
  text and image tokenizers, ``jam chat`` (docs/CONVERSATIONS.md)
- ``answer``: ``Answer``, ``TextSegment``, ``ImageSegment``, ``split_segments``
- ``render``: JSON lines, Markdown, HTML, PNGs through an image-tokenizer decoder
- ``run`` / ``cli``: ``jam-generate``
"""

from .answer import Answer, ImageSegment, TextSegment, split_segments
from .cfg import blend, unconditional_prompt
from .conversation import Conversation
from .engine import Engine, GenerationConfig
from .sampling import SamplingConfig, sample
from .state import MixedModalRules, MixedModalState

__all__ = [
    "Answer", "Conversation", "Engine", "GenerationConfig", "ImageSegment", "MixedModalRules", "MixedModalState",
    "SamplingConfig", "TextSegment", "blend", "sample", "split_segments", "unconditional_prompt",
]

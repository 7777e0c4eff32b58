"""Incremental decoding with the explicit ``KVCache`` equals the full forward pass,
for the parent decoder, JAM-Width (a twice-as-wide ``DecoderLM``, §2.1.2) and JAM-Cross (§2.1.3,
cross blocks every 1 / 2 / no layers), OPT and Llama family, with and without left padding.
"""

from __future__ import annotations

import pytest
import torch

from _model_util import left_pad, randomize_, random_tokens, tiny_cfg
from jam_metaseq.models import DecoderLM, JamCrossLM, build_model, cross_of, preset, width_of

ATOL = 1e-5


def _models():
    parent = tiny_cfg(layers=3)
    llama, gemma = preset("llama_tiny", layers=3), preset("gemma_tiny")
    return {
        "decoder": parent,
        "width": width_of(parent),
        "cross_every_1": cross_of(parent, 1),
        "cross_every_2": cross_of(parent, 2),
        "cross_every_0": cross_of(parent, 0),
        # The Llama family (rotary positions per row, grouped k/v heads in the cache, Gemma's head width)
        "llama": llama,
        "gemma_width": width_of(gemma),
        "llama_cross_every_2": cross_of(llama, 2),
    }


MODELS = _models()


def _build(name: str):
    torch.manual_seed(0)
    # Random everything (not just the init): cross blocks and LayerNorms are all active.
    return randomize_(build_model(MODELS[name]), seed=11).eval()


def _decode(model, tokens: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of ``tokens`` (B, T) fed through the cache in chunks of the given sizes."""
    B, T = tokens.shape
    assert sum(chunks) == T
    cache = model.setup_caches(B, T + 3)
    out, start = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(model(tokens[:, start : start + n], cache=cache))
            start += n
    assert cache.length == T
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", list(MODELS))
def test_one_token_at_a_time_equals_full_forward(name):
    model = _build(name)
    tokens = random_tokens(2, 12, low=0, high=128, seed=2)
    with torch.no_grad():
        full = model(tokens)
    torch.testing.assert_close(_decode(model, tokens, [1] * 12), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_prefill_then_chunks_equals_full_forward(name):
    model = _build(name)
    tokens = random_tokens(3, 13, low=0, high=128, seed=3)
    with torch.no_grad():
        full = model(tokens)
    torch.testing.assert_close(_decode(model, tokens, [7, 1, 3, 1, 1]), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_left_padded_batch_decodes_like_full_forward_and_like_each_row_alone(name):
    model = _build(name)
    pad = 1
    rows = [random_tokens(1, n, low=0, high=128, seed=20 + n)[0] for n in (6, 3, 1)]
    prompt = left_pad(rows, padding_idx=pad)  # (3, 6)
    cont = random_tokens(3, 4, low=0, high=128, seed=5)  # 4 generated tokens per row
    tokens = torch.cat([prompt, cont], dim=1)
    real = tokens.ne(pad)
    with torch.no_grad():
        full = model(tokens)
    stepped = _decode(model, tokens, [prompt.shape[1], 1, 1, 1, 1])
    torch.testing.assert_close(stepped[real], full[real], atol=ATOL, rtol=0)
    # A padded row gives what the row gives alone: padding neither attends nor shifts positions.
    with torch.no_grad():
        for b, row in enumerate(rows):
            alone = model(torch.cat([row, cont[b]])[None])[0]
            torch.testing.assert_close(full[b, -alone.shape[0] :], alone, atol=ATOL, rtol=0)


def test_cache_is_used():
    """Control: decoding the last token with an empty cache (no context) gives different logits."""
    model = _build("cross_every_2")
    tokens = random_tokens(1, 8, low=0, high=128, seed=9)
    with torch.no_grad():
        full = model(tokens)
        alone = model(tokens[:, -1:], cache=model.setup_caches(1, 4))
    assert (alone[:, 0] - full[:, -1]).abs().max() > 100 * ATOL


def test_cache_overflow_is_refused():
    model = _build("decoder")
    cache = model.setup_caches(1, 4)
    with torch.no_grad():
        model(random_tokens(1, 3, low=0, high=128, seed=1), cache=cache)
        with pytest.raises(ValueError, match="KV cache holds 4"):
            model(random_tokens(1, 2, low=0, high=128, seed=2), cache=cache)


def test_select_rows_keeps_the_chosen_sequences():
    """After dropping row 0 of the batch, decoding row 1 continues exactly as in the full pass."""
    model = _build("cross_every_1")
    tokens = random_tokens(2, 9, low=0, high=128, seed=4)
    with torch.no_grad():
        full = model(tokens)
        cache = model.setup_caches(2, 9)
        model(tokens[:, :6], cache=cache)
        cache.select_rows(torch.tensor([1]))
        rest = model(tokens[1:, 6:], cache=cache)
    torch.testing.assert_close(rest[0], full[1, 6:], atol=ATOL, rtol=0)


def test_cache_slots_cover_every_attention():
    parent = tiny_cfg(layers=4)
    assert DecoderLM(parent).num_attention_slots == 4
    for every, pairs in ((1, 4), (2, 2), (4, 1), (0, 0)):
        assert JamCrossLM(cross_of(parent, every)).num_attention_slots == 2 * 4 + 2 * pairs

"""Shared pieces of the generation tests: tiny configs of the three architectures, prompts, the
float64 copy for token comparisons, and the one-thread fixture (import it into a test module to
use it there)."""

from __future__ import annotations

import copy

import pytest
import torch

from jam_metaseq.models import cross_of, preset, width_of
from jam_metaseq.vocab import tiny_manifest

VOCAB = tiny_manifest()
T0 = VOCAB.text_start
PROMPTS = [
    [VOCAB.bos, T0 + 5, T0 + 9, T0 + 2],
    [VOCAB.bos, T0 + 1],
    [VOCAB.bos, T0 + 7, T0 + 7, T0 + 3, T0 + 30, T0 + 11],
]
ARCHS = ["decoder", "width", "cross"]
FAMILY_ARCHS = ["gemma", "llama_cross"]
"""The Llama family (issue 23): Gemma's decoder (rotary, one k/v head, head width 16 > E / H) and
JAM-Cross of two Llama parents (rotary per branch, grouped k/v heads, untied head)."""


def tiny_config(arch: str, vocab=VOCAB):
    """``arch`` in ARCHS or FAMILY_ARCHS over a tiny preset. init_std 0.3 instead of 0.02: logits
    far from uniform, so guidance and seeds visibly matter."""
    if arch in FAMILY_ARCHS:
        family = preset("gemma_tiny" if arch == "gemma" else "llama_tiny", vocab_size=vocab.size, max_positions=96,
                        init_std=0.3, padding_idx=vocab.pad)
        return family if arch == "gemma" else cross_of(
            family, cross_every=1, image_vocab_start=vocab.image_start, image_vocab_end=vocab.image_end)
    parent = preset("tiny", vocab_size=vocab.size, max_positions=96, init_std=0.3)
    if arch == "decoder":
        return parent
    if arch == "width":
        return width_of(parent)
    return cross_of(parent, cross_every=1, image_vocab_start=vocab.image_start, image_vocab_end=vocab.image_end)


def float64(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``model`` for tests that compare *tokens* between computations of different
    shapes (batched vs alone, cached vs uncached, eager vs static decode, CFG rows vs plain rows).

    The random numbers are a function of (seed, step), but the logits of two such computations
    agree only up to rounding (~1e-6 in float32, and another CPU rounds differently). A sampled
    token flips when its uniform number lies closer than that to a CDF boundary: in float32 these
    tests' closest draws are ~1e-6 away. In float64 the logits agree to ~1e-15, and they reach the
    sampler (float32) as the same float32 numbers, so the tokens agree on any CPU. The float32 path
    is compared at the logits level, with a tolerance (test_generation_static, test_models_cache).
    See docs/TESTING.md.
    """
    return copy.deepcopy(model).double()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and the machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

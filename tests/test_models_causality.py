"""No future leakage: the logits at position t do not depend on inputs at positions > t.

For JAM-Cross (§2.1.3; cross-attention is causal so the fused model stays autoregressive) every cross
block in both directions, and for JAM-Width (§2.1.2) and the parent decoder, the gradient of the
logits at t with respect to the input embeddings at every position > t is exactly zero, while it is
non-zero for positions <= t. A non-causal control shows the check can fail.
"""

from __future__ import annotations

import pytest
import torch

from _model_util import left_pad, randomize_, random_tokens, tiny_cfg
from jam_metaseq.models import build_model, cross_of, width_of
from jam_metaseq.models.decoder import AttentionContext, build_context

T = 9


def _embedding_grads(model, tokens: torch.Tensor, t: int) -> list[torch.Tensor]:
    """d(sum of logits at position t)/d(token embedding output), one (B, T, E) per embedding call."""
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = model.decoder.embed_tokens.register_forward_hook(hook)
    try:
        logits = model(tokens)
    finally:
        handle.remove()
    # A random direction rather than a plain sum: no accidental cancellation across the vocabulary.
    w = torch.randn(logits.shape[0], logits.shape[-1], generator=torch.Generator().manual_seed(t))
    return list(torch.autograd.grad((logits[:, t] * w).sum(), captured))


@pytest.mark.parametrize(
    "cfg",
    [tiny_cfg(layers=3), width_of(tiny_cfg(layers=3)), cross_of(tiny_cfg(layers=3), 1), cross_of(tiny_cfg(layers=3), 2)],
    ids=["decoder", "width", "cross_every_1", "cross_every_2"],
)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_logits_at_t_ignore_later_inputs(cfg, padded):
    model = randomize_(build_model(cfg), seed=3).eval()
    if padded:
        rows = [random_tokens(1, n, low=0, high=128, seed=n)[0] for n in (T, T - 3)]
        tokens = left_pad(rows, padding_idx=1)
    else:
        tokens = random_tokens(2, T, low=0, high=128, seed=4)
    for t in range(T):
        grads = _embedding_grads(model, tokens, t)
        assert len(grads) == 1  # one token-embedding lookup (shared by JAM-Cross's two branches)
        for g in grads:  # (B, T, E)
            assert torch.count_nonzero(g[:, t + 1 :]) == 0, f"position {t} sees the future"
            real = tokens[:, t].ne(1)
            assert g[real, t].abs().sum() > 0  # and it does see itself


def _cross_blocks(model):
    d = model.decoder
    return [("llm", j, b) for j, b in enumerate(d.x_attn_layers_llm)] + [
        ("cm3", j, b) for j, b in enumerate(d.x_attn_layers_cm3)
    ]


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_every_cross_block_is_causal_in_both_inputs(padded):
    """Each block's output at t depends on its own branch and the other branch only at positions <= t."""
    cfg = cross_of(tiny_cfg(layers=4), 1)
    model = randomize_(build_model(cfg), seed=5).eval()
    blocks = _cross_blocks(model)
    assert len(blocks) == 8  # 4 pairs, both directions
    if padded:
        tokens = left_pad([random_tokens(1, T, low=4, high=128, seed=1)[0],
                           random_tokens(1, 4, low=4, high=128, seed=2)[0]], padding_idx=1)
    else:
        tokens = random_tokens(2, T, low=4, high=128, seed=1)
    ctx = build_context(tokens, padding_idx=1, cache=None)
    g = torch.Generator().manual_seed(0)
    for branch, j, block in blocks:
        x = torch.randn(2, T, 32, generator=g, requires_grad=True)
        other = torch.randn(2, T, 32, generator=g, requires_grad=True)
        out = block(x, other, ctx)
        for t in range(T):
            gx, go = torch.autograd.grad(out[:, t].sum(), (x, other), retain_graph=True)
            assert torch.count_nonzero(gx[:, t + 1 :]) == 0, f"x_attn_layers_{branch}.{j}: own future at {t}"
            assert torch.count_nonzero(go[:, t + 1 :]) == 0, f"x_attn_layers_{branch}.{j}: other future at {t}"
            # It does read the other branch at the positions it may see (real, <= t).
            visible = tokens[:, : t + 1].ne(1)
            if visible[0].any():
                assert go[0, : t + 1][visible[0]].abs().sum() > 0


def test_non_causal_control_leaks():
    """Control: the same gradient check flags a block run without the causal mask."""
    cfg = cross_of(tiny_cfg(layers=2), 1)
    model = randomize_(build_model(cfg), seed=5).eval()
    block = model.decoder.x_attn_layers_llm[0]
    open_ctx = AttentionContext(mask=None, is_causal=False, cache=None)
    x = torch.randn(1, T, 32, requires_grad=True)
    other = torch.randn(1, T, 32, requires_grad=True)
    (go,) = torch.autograd.grad(block(x, other, open_ctx)[:, 0].sum(), (other,))
    assert torch.count_nonzero(go[:, 1:]) > 0

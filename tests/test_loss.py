"""The CM3 criterion math (JAM §3.1 Objective) on hand-computed cases and properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from jam_metaseq.objectives.loss import cm3_loss, per_token_nll, perplexity, reduce_token_nll, token_weights
from jam_metaseq.vocab import tiny_manifest

VOCAB = tiny_manifest()  # text [4, 68), image [68, 100), break 100, sentinels [101, 105), eoss 105


def test_hand_computed_uniform_logits():
    v = VOCAB.size
    logits = torch.zeros(1, 5, v)  # uniform: every nll is log(V)
    targets = torch.tensor([[5, VOCAB.image_start, VOCAB.break_id, VOCAB.sentinel(0), 1]])
    out = cm3_loss(logits, targets, vocab=VOCAB)
    lv = math.log(v)
    assert out.weight_sum.item() == 4  # the pad target does not count
    assert out.loss.item() == pytest.approx(4 * lv)
    assert out.text_tokens.item() == 1 and out.text_nll_sum.item() == pytest.approx(lv)
    assert out.image_tokens.item() == 1 and out.image_nll_sum.item() == pytest.approx(lv)
    assert out.ntokens.item() == 4


def test_hand_computed_peaked_logits_per_modality():
    v = VOCAB.size
    logits = torch.zeros(1, 2, v)
    logits[0, 0, 10] = math.log(3.0)  # p(10) = 3 / (V + 2)
    targets = torch.tensor([[10, VOCAB.image_start + 3]])
    out = cm3_loss(logits, targets, vocab=VOCAB)
    assert out.text_nll_sum.item() == pytest.approx(-math.log(3 / (v + 2)), rel=1e-6)
    assert out.image_nll_sum.item() == pytest.approx(math.log(v), rel=1e-6)
    assert perplexity(out.text_nll_sum.item(), out.text_tokens.item()) == pytest.approx((v + 2) / 3, rel=1e-5)


def test_sentinel_weight_zero_and_loss_mask():
    targets = torch.tensor([[7, VOCAB.sentinel(1), 9, VOCAB.eoss]])
    w = token_weights(targets, vocab=VOCAB, sentinel_weight=0.0)
    assert w.tolist() == [[1.0, 0.0, 1.0, 1.0]]
    mask = torch.tensor([[False, True, True, True]])  # e.g. instruction mode: prompt not trained
    w = token_weights(targets, vocab=VOCAB, loss_mask=mask, sentinel_weight=0.0)
    assert w.tolist() == [[0.0, 0.0, 1.0, 1.0]]
    logits = torch.randn(1, 4, VOCAB.size)
    out = cm3_loss(logits, targets, vocab=VOCAB, loss_mask=mask, sentinel_weight=0.0)
    nll = per_token_nll(logits, targets)[0]
    assert out.loss.item() == pytest.approx((nll[2] + nll[3]).item(), rel=1e-6)
    assert out.text_tokens.item() == 1  # only target 9; 7 is masked out
    with pytest.raises(ValueError, match="loss_mask shape"):
        token_weights(targets, vocab=VOCAB, loss_mask=mask[:, :2])


def test_matches_torch_cross_entropy_and_grad():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, VOCAB.size, requires_grad=True)
    targets = torch.randint(0, VOCAB.size, (3, 6))
    targets[0, :2] = 1  # some padding
    out = cm3_loss(logits, targets, vocab=VOCAB)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB.size), targets.reshape(-1),
                                            ignore_index=1, reduction="sum")
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    (out.loss / out.weight_sum).backward()
    assert logits.grad is not None and logits.grad[0, :2].abs().sum() == 0


def test_inf_on_weight_zero_token_does_not_leak():
    nll = torch.tensor([[float("inf"), 1.0]])
    targets = torch.tensor([[1, 5]])
    out = reduce_token_nll(nll, targets, vocab=VOCAB, weights=torch.tensor([[0.0, 1.0]]))
    assert out.loss.item() == 1.0 and out.nll_sum.item() == 1.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, VOCAB.size - 1), min_size=1, max_size=24), st.integers(0, 2**31 - 1))
def test_modality_sums_partition_the_total(ids, seed):
    g = torch.Generator().manual_seed(seed)
    targets = torch.tensor([ids])
    logits = torch.randn(1, len(ids), VOCAB.size, generator=g)
    out = cm3_loss(logits, targets, vocab=VOCAB)
    t = torch.tensor(ids)
    other = (~VOCAB.is_text(t) & ~VOCAB.is_image(t) & (t != 1)).sum().item()
    assert out.text_tokens.item() + out.image_tokens.item() + other == out.ntokens.item()
    assert out.text_nll_sum.item() + out.image_nll_sum.item() <= out.nll_sum.item() + 1e-4
    # the per-modality sums are independent of how the batch is split
    if len(ids) > 1:
        h = len(ids) // 2
        a = cm3_loss(logits[:, :h], targets[:, :h], vocab=VOCAB)
        b = cm3_loss(logits[:, h:], targets[:, h:], vocab=VOCAB)
        assert (a.image_nll_sum + b.image_nll_sum).item() == pytest.approx(out.image_nll_sum.item(), rel=1e-5, abs=1e-5)

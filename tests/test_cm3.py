"""CM3 transform (jam_metaseq.objectives.cm3): hand-computed cases and hypothesis properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jam_metaseq.objectives.cm3 import (
    CM3Config, apply_spans, cm3_inverse, cm3_transform, draw_spans, item_rng)
from jam_metaseq.vocab import tiny_manifest

V = tiny_manifest(text_size=64, image_codes=32, image_grid=(2, 2), num_sentinels=16)
BRK, EOS, EOSS, PAD = V.break_id, V.eos, V.eoss, V.pad
M = [V.sentinel(i) for i in range(V.num_sentinels)]
a, b, c, d, e = (V.text_start + i for i in range(5))


def T(*ids):
    return np.array(ids, dtype=np.int64)


# ---- hand-computed -----------------------------------------------------------------------------
def test_apply_spans_hand_case():
    tokens = T(a, b, c, d, e, EOS)
    spans = np.array([[1, 2], [3, 5]])
    out, w = apply_spans(tokens, spans, vocab=V, weights=np.array([1, 0, 1, 1, 0, 1], np.float32),
                         sentinel_weight=0.0)
    assert out.tolist() == [a, M[0], c, M[1], EOS, M[0], b, EOSS, M[1], d, e, EOSS]
    # weights move with the tokens; sentinels 0; <eoss> takes its span's last token's mask
    assert w.tolist() == [1, 0, 1, 0, 1, 0, 0, 0, 0, 1, 0, 0]


def test_fim_on_two_tokens_gives_the_three_possible_spans():
    # candidates {0, 1, 2}: spans [0,1), [0,2), [1,2), each equally likely
    expected = {
        (M[0], b, M[0], a, EOSS),
        (M[0], M[0], a, b, EOSS),
        (a, M[0], M[0], b, EOSS),
    }
    seen = set()
    for seed in range(60):
        out = cm3_transform(T(a, b), np.random.default_rng(seed), vocab=V, mode="fim",
                            cross_documents=True)
        seen.add(tuple(out.tolist()))
    assert seen == expected


def test_span_is_cut_at_break():
    # maskable {0, 2} + end 3: [0,2) and [0,3) are cut at the <break> to [0,1); [2,3) stays
    expected = {(M[0], BRK, b, M[0], a, EOSS), (a, BRK, M[0], M[0], b, EOSS)}
    seen = {tuple(cm3_transform(T(a, BRK, b), np.random.default_rng(s), vocab=V, mode="fim").tolist())
            for s in range(40)}
    assert seen == expected


def test_no_spans_leaves_sequence_unchanged():
    tokens = T(a, b, BRK, V.image_start, V.image_start + 1, V.image_start + 2, V.image_start + 3, BRK, c, EOS)
    out = cm3_transform(tokens, np.random.default_rng(0), vocab=V, mode="fixed", num_spans=0, min_spans=0)
    assert np.array_equal(out, tokens)
    # nothing maskable: only barriers
    out = cm3_transform(T(BRK, EOS, BRK), np.random.default_rng(0), vocab=V, min_spans=3, max_spans=3)
    assert out.tolist() == [BRK, EOS, BRK]


def test_determinism_and_seed_sensitivity():
    tokens = np.arange(V.text_start, V.text_start + 60, dtype=np.int64)
    outs = [cm3_transform(tokens, np.random.default_rng(7), vocab=V, min_spans=3, max_spans=3) for _ in range(2)]
    assert np.array_equal(outs[0], outs[1])
    other = cm3_transform(tokens, np.random.default_rng(8), vocab=V, min_spans=3, max_spans=3)
    assert not np.array_equal(outs[0], other)


def test_item_rng_is_per_item():
    tokens = np.arange(V.text_start, V.text_start + 60, dtype=np.int64)
    f = lambda *k: cm3_transform(tokens, item_rng(*k), vocab=V, min_spans=2, max_spans=4).tolist()
    assert f(0, 1, 5) == f(0, 1, 5)
    assert f(0, 1, 5) != f(0, 2, 5) and f(0, 1, 5) != f(0, 1, 6)


def test_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="exceeds"):
        cm3_transform(T(a, b), rng, vocab=V, max_spans=17)
    with pytest.raises(ValueError, match="sentinel"):
        cm3_transform(T(a, M[0], b), rng, vocab=V)
    with pytest.raises(ValueError, match="return_loss_weights"):
        cm3_transform(T(a, b), rng, vocab=V, loss_mask=np.ones(2, bool))
    with pytest.raises(ValueError, match="mode"):
        cm3_transform(T(a, b), rng, vocab=V, mode="span")
    with pytest.raises(ValueError, match="not <mask"):
        cm3_inverse(T(a, M[1], M[0], b, EOSS), vocab=V)


def test_poisson_span_count_distribution():
    # n ~ Poisson(1) clamped to [0, 16]: mean 1, P(n=0) = e^-1 (on a long sequence, no capacity limit)
    tokens = np.arange(V.text_start, V.text_start + 64, dtype=np.int64).repeat(4)
    rng = np.random.default_rng(123)
    counts = np.array([
        int(V.is_sentinel(cm3_transform(tokens, rng, vocab=V, min_spans=0, max_spans=16)).sum()) // 2
        for _ in range(3000)])
    assert abs(counts.mean() - 1.0) < 0.06
    assert abs((counts == 0).mean() - np.exp(-1)) < 0.03
    # clamping to min_spans=1 removes zeros
    rng = np.random.default_rng(5)
    n1 = [int(V.is_sentinel(cm3_transform(tokens, rng, vocab=V)).sum()) // 2 for _ in range(300)]
    assert min(n1) == 1


def test_truncation_policy():
    tokens = np.arange(V.text_start, V.text_start + 40, dtype=np.int64)
    for seed in range(20):
        out = cm3_transform(tokens, np.random.default_rng(seed), vocab=V, mode="fixed", num_spans=4,
                            min_spans=1, max_len=30)
        assert out.size == 30  # 18 input tokens kept + 3 * 4
        assert np.array_equal(cm3_inverse(out, vocab=V), tokens[:18])
    # short input: nothing cut
    out = cm3_transform(tokens[:5], np.random.default_rng(0), vocab=V, mode="fixed", num_spans=2, max_len=30)
    assert np.array_equal(cm3_inverse(out, vocab=V), tokens[:5])


def test_cross_documents_negative_control():
    # eos is a barrier by default; with cross_documents=True a span may swallow it
    tokens = T(a, b, EOS, c, d, EOS)
    seen_default, seen_cross = False, False
    for seed in range(200):
        out = cm3_transform(tokens, np.random.default_rng(seed), vocab=V, mode="fim")
        seen_default |= _moved_contains(out, EOS)
        out = cm3_transform(tokens, np.random.default_rng(seed), vocab=V, mode="fim", cross_documents=True)
        seen_cross |= _moved_contains(out, EOS)
    assert not seen_default and seen_cross


def _moved_contains(out, token) -> bool:
    first_moved = np.flatnonzero(V.is_sentinel(out))
    first_moved = first_moved[first_moved.size // 2]
    return bool((out[first_moved:] == token).any())


def test_config_apply_matches_function():
    cfg = CM3Config(min_spans=2, max_spans=4, sentinel_weight=0.5)
    tokens = np.arange(V.text_start, V.text_start + 30, dtype=np.int64)
    mask = np.arange(30) % 3 != 0
    out1, w1 = cfg.apply(tokens, np.random.default_rng(3), vocab=V, loss_mask=mask)
    out2, w2 = cm3_transform(tokens, np.random.default_rng(3), vocab=V, min_spans=2, max_spans=4,
                             sentinel_weight=0.5, return_loss_weights=True, loss_mask=mask)
    assert np.array_equal(out1, out2) and np.array_equal(w1, w2)
    assert np.all(w1[V.is_sentinel(out1)] == 0.5)


# ---- properties ----------------------------------------------------------------------------------
@st.composite
def sequences(draw):
    """Random documents: text runs, images framed by <break>, <eos> document ends, maybe padding."""
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["text", "text", "image", "eos"]))
        if kind == "text":
            parts += draw(st.lists(st.integers(V.text_start, V.text_end - 1), min_size=1, max_size=12))
        elif kind == "image":
            parts += [BRK] + draw(st.lists(st.integers(V.image_start, V.image_end - 1), min_size=4,
                                           max_size=4)) + [BRK]
        else:
            parts.append(EOS)
    parts += [PAD] * draw(st.integers(0, 2))
    return np.array(parts, dtype=np.int64)


@settings(max_examples=300, deadline=None)
@given(tokens=sequences(), seed=st.integers(0, 2**32 - 1), min_spans=st.integers(0, 4),
       extra=st.integers(0, 12), mode=st.sampled_from(["poisson", "fixed", "fim"]),
       lam=st.floats(0.1, 6.0))
def test_cm3_properties(tokens, seed, min_spans, extra, mode, lam):
    max_spans = min_spans + extra
    mask = (np.arange(tokens.size) * 7 + seed) % 3 != 0
    out, w = cm3_transform(tokens, np.random.default_rng(seed), vocab=V, mode=mode, lam=lam,
                           min_spans=min_spans, max_spans=max_spans, num_spans=max_spans,
                           return_loss_weights=True, loss_mask=mask)
    n = int(V.is_sentinel(out).sum()) // 2
    assert out.size == tokens.size + 3 * n and w.shape == out.shape
    assert n <= (1 if mode == "fim" else max_spans)
    # sentinels in order, twice
    sent = out[V.is_sentinel(out)]
    assert sent.tolist() == [V.sentinel(i) for i in range(n)] * 2
    # inverting gives back the original; so every token appears exactly once, in place or in its span
    assert np.array_equal(cm3_inverse(out, vocab=V), tokens)
    kept = out[~(V.is_sentinel(out) | (out == EOSS))]
    assert np.array_equal(np.sort(kept), np.sort(tokens))  # same multiset: each token exactly once
    # no span contains a barrier (hence none crosses <break> or a document end)
    if n:
        moved = out[np.flatnonzero(V.is_sentinel(out))[n]:]
        assert not np.isin(moved, [BRK, EOS, PAD, V.bos]).any()
        assert (moved == EOSS).sum() == n
    # the loss mask travels with the tokens: undo the transform on (token, weight) pairs
    if n == 0:
        assert np.array_equal(out, tokens) and np.array_equal(w, mask.astype(np.float32))
    assert np.all(w[V.is_sentinel(out)] == 0.0)
    # weights of non-sentinel outputs, read back into original order, equal the mask
    keep = ~(V.is_sentinel(out) | (out == EOSS))
    order = _original_positions(out, n)
    assert np.array_equal(w[keep][np.argsort(order)], mask.astype(np.float32))


def _original_positions(out, n):
    """For each non-sentinel, non-<eoss> output position, its index in the original sequence."""
    sent_pos = np.flatnonzero(V.is_sentinel(out))
    eoss_pos = np.flatnonzero(out == EOSS)
    pos = []  # original index of kept positions, computed by walking the prefix and the spans
    span_lengths = [eoss_pos[i] - sent_pos[n + i] - 1 for i in range(n)]
    orig = 0
    prefix_end = sent_pos[n] if n else out.size
    span_orig_start = []
    for t in range(prefix_end):
        if V.is_sentinel(out[t]):
            i = int(out[t] - V.sentinel_start)
            span_orig_start.append(orig)
            orig += span_lengths[i]
        else:
            pos.append(orig)
            orig += 1
    for i in range(n):
        pos.extend(range(span_orig_start[i], span_orig_start[i] + span_lengths[i]))
    return np.array(pos, dtype=np.int64)


@settings(max_examples=100, deadline=None)
@given(tokens=sequences(), seed=st.integers(0, 2**32 - 1), max_len=st.integers(1, 40))
def test_max_len_is_respected(tokens, seed, max_len):
    out = cm3_transform(tokens, np.random.default_rng(seed), vocab=V, min_spans=1, max_spans=8, max_len=max_len)
    assert out.size <= max(max_len, 0)
    n = int(V.is_sentinel(out).sum()) // 2
    assert np.array_equal(cm3_inverse(out, vocab=V), tokens[: out.size - 3 * n])


@settings(max_examples=100, deadline=None)
@given(tokens=sequences(), seed=st.integers(0, 2**32 - 1), n=st.integers(0, 8))
def test_draw_spans_are_disjoint_and_barrier_free(tokens, seed, n):
    spans = draw_spans(tokens, np.random.default_rng(seed), n, vocab=V)
    assert spans.shape[0] <= n
    if spans.size:
        assert np.all(spans[:, 1] > spans[:, 0])
        assert np.all(spans[1:, 0] > spans[:-1, 1])  # disjoint and not touching
        for s, e in spans:
            assert not np.isin(tokens[s:e], [BRK, EOS, PAD, V.bos]).any()


# ---- conversations: spans stay inside one turn -----------------------------------------------------
VC = tiny_manifest(text_size=64, image_codes=32, image_grid=(2, 2), num_sentinels=16, conversation_tokens=True)
TURN_TOKENS = [VC.user_id, VC.assistant_id, VC.eot]


@st.composite
def conversations(draw):
    """A conversation as the data lays it out (``<user> ... <eot> <assistant> ... <eot> ... <eos>``,
    turn contents of text runs and framed images) and its loss mask (assistant contents and their
    ``<eot>``), maybe followed by another document."""
    toks, mask = [], []
    for k in range(draw(st.integers(1, 6))):
        role = VC.assistant_id if k % 2 else VC.user_id
        content = []
        for _ in range(draw(st.integers(1, 3))):
            if draw(st.booleans()):
                content += draw(st.lists(st.integers(VC.text_start, VC.text_end - 1), min_size=1, max_size=8))
            else:
                content += [VC.break_id] + [VC.image_start + draw(st.integers(0, 31)) for _ in range(4)] + [VC.break_id]
        toks += [role, *content, VC.eot]
        mask += [False] + [bool(k % 2)] * (len(content) + 1)
    toks.append(VC.eos)
    mask.append(False)
    if draw(st.booleans()):
        toks += draw(st.lists(st.integers(VC.text_start, VC.text_end - 1), min_size=1, max_size=8))
        mask += [True] * (len(toks) - len(mask))
    return np.array(toks, dtype=np.int64), np.array(mask)


@settings(max_examples=200, deadline=None)
@given(conv=conversations(), seed=st.integers(0, 2**32 - 1), spans=st.integers(1, 8))
def test_spans_never_move_a_turn_boundary(conv, seed, spans):
    """With conversation tokens, no span holds or crosses ``<user>``, ``<assistant>`` or ``<eot>``:
    the turn skeleton stays in place and in order, every ``<mask:i>`` sits inside one turn's
    content, and each moved span carries one loss weight (all user: 0, all assistant: 1)."""
    tokens, mask = conv
    out, w = cm3_transform(tokens, np.random.default_rng(seed), vocab=VC, mode="fixed", min_spans=spans,
                           max_spans=16, num_spans=spans, return_loss_weights=True, loss_mask=mask)
    assert np.array_equal(cm3_inverse(out, vocab=VC), tokens)
    n = int(VC.is_sentinel(out).sum()) // 2
    sent = np.flatnonzero(VC.is_sentinel(out))
    prefix_end = sent[n] if n else out.size
    prefix = out[:prefix_end]
    assert prefix[np.isin(prefix, TURN_TOKENS)].tolist() == tokens[np.isin(tokens, TURN_TOKENS)].tolist()
    for p in sent[:n]:  # inside a turn: the last turn token before it opens a turn, the next one closes it
        before = prefix[:p][np.isin(prefix[:p], TURN_TOKENS)]
        after = prefix[p + 1:][np.isin(prefix[p + 1:], TURN_TOKENS)]
        if before.size and before[-1] in (VC.user_id, VC.assistant_id):
            assert after.size and after[0] == VC.eot
    eoss = np.flatnonzero(out == VC.eoss)
    for i in range(n):
        span, weights = out[sent[n + i] + 1:eoss[i]], w[sent[n + i] + 1:eoss[i] + 1]
        assert not np.isin(span, TURN_TOKENS + [VC.break_id, VC.eos]).any()
        assert np.unique(weights).size == 1  # one turn's tokens: all user or all assistant


def test_a_span_is_cut_at_the_end_of_a_turn():
    """Hand case: a span that starts in an assistant's answer stops before its ``<eot>``, whatever
    end was drawn (200 draws)."""
    x, y, z = (VC.text_start + i for i in range(3))
    tokens = T(VC.user_id, x, VC.eot, VC.assistant_id, y, z, VC.eot, VC.user_id, x, VC.eot, VC.eos)
    spans = draw_spans(tokens, np.random.default_rng(0), 8, vocab=VC)
    for s, e in spans:
        assert not np.isin(tokens[s:e], TURN_TOKENS).any()
    # every maskable position is in some draw; the span starting at y never reaches the <eot> at 6
    starts = {}
    for seed in range(200):
        for s, e in draw_spans(tokens, np.random.default_rng(seed), 2, vocab=VC):
            starts[int(s)] = max(starts.get(int(s), 0), int(e))
    assert starts[4] <= 6 and starts[5] <= 6

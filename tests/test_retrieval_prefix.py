"""Retrieved-document prefixes: separators, truncation rule, never splitting an image (§3.1)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jam_metaseq.retrieval.prefix import build_retrieval_prefix, prepend_retrieved, safe_cut
from jam_metaseq.vocab import tiny_manifest

V = tiny_manifest()  # text [4, 68), image [68, 100), 4 tokens per image
T = V.text_start
BRK, EOS, BOS = V.break_id, V.eos, V.bos


def img(c: int = 0) -> list[int]:
    return [BRK] + [V.image_start + c] * V.image_tokens_per_image + [BRK]


def test_layout_hand_computed():
    d1 = np.array([T + 1, T + 2, EOS])            # trailing eos stripped, separator added
    d2 = np.array([BOS, T + 3] + img(1) + [EOS])  # leading bos stripped too
    out = build_retrieval_prefix([d1, d2], vocab=V, max_len=100)
    assert out.tolist() == [T + 1, T + 2, EOS, T + 3] + img(1) + [EOS]


def test_truncation_drops_whole_image_and_later_docs():
    d1 = np.array([T + 1, T + 2])
    d2 = np.array([T + 3] + img(2) + [T + 4])
    d3 = np.array([T + 5])
    # budget 7: d1 + sep = 3, leaves 4: d2 needs 8; a cut inside the image falls back to [T+3]
    out = build_retrieval_prefix([d1, d2, d3], vocab=V, max_len=7)
    assert out.tolist() == [T + 1, T + 2, EOS, T + 3, EOS]
    # budget 10: d2 cut after its closing <break> (7 tokens) + sep = 8 > 7 left -> cut at 1 again
    assert build_retrieval_prefix([d1, d2, d3], vocab=V, max_len=10).tolist() == [T + 1, T + 2, EOS, T + 3, EOS]
    # budget 11: d1(3) + d2 cut after the image (7 + sep) fits exactly; d3 dropped
    assert build_retrieval_prefix([d1, d2, d3], vocab=V, max_len=11).tolist() == \
        [T + 1, T + 2, EOS, T + 3] + img(2) + [EOS]


def test_doc_starting_with_image_is_dropped_when_image_does_not_fit():
    d = np.array(img(0) + [T + 1])
    assert build_retrieval_prefix([d], vocab=V, max_len=5).size == 0
    assert safe_cut(d, limit=5, vocab=V) == 0
    assert safe_cut(d, limit=6, vocab=V) == 6


def test_tiny_budgets():
    d = np.array([T + 1, T + 2])
    assert build_retrieval_prefix([d], vocab=V, max_len=0).size == 0
    assert build_retrieval_prefix([d], vocab=V, max_len=1).size == 0
    assert build_retrieval_prefix([d], vocab=V, max_len=2).tolist() == [T + 1, EOS]
    assert build_retrieval_prefix([], vocab=V, max_len=50).size == 0


def test_prepend_keeps_bos_first_and_marks_prefix():
    seq = np.array([BOS, T + 9, T + 8, EOS])
    tokens, is_prefix = prepend_retrieved(seq, [np.array([T + 1, T + 2])], vocab=V, context=8)
    assert tokens.tolist() == [BOS, T + 1, T + 2, EOS, T + 9, T + 8, EOS]
    assert is_prefix.tolist() == [False, True, True, True, False, False, False]
    # no room: the sequence is returned as is
    tokens, is_prefix = prepend_retrieved(seq, [np.array([T + 1])], vocab=V, context=4)
    assert tokens.tolist() == seq.tolist() and not is_prefix.any()


# ---- properties ---------------------------------------------------------------------------
segment = st.one_of(
    st.lists(st.integers(V.text_start, V.text_end - 1), min_size=1, max_size=6),
    st.integers(0, V.image_codes - 1).map(img),
)
document = st.lists(segment, min_size=1, max_size=4).map(lambda segs: np.array(sum(segs, []) + [EOS]))


def _images_whole(tokens: np.ndarray) -> bool:
    """Every image code run is framed: <break> + exactly n codes + <break>."""
    n = V.image_tokens_per_image
    i = 0
    t = tokens.tolist()
    while i < len(t):
        if t[i] == BRK:
            codes = t[i + 1:i + 1 + n]
            if len(codes) != n or not all(V.is_image(c) for c in codes) or i + 1 + n >= len(t) \
                    or t[i + 1 + n] != BRK:
                return False
            i += n + 2
        elif V.is_image(t[i]):
            return False
        else:
            i += 1
    return True


@settings(max_examples=150, deadline=None)
@given(docs=st.lists(document, max_size=4), max_len=st.integers(0, 40))
def test_prefix_fits_and_keeps_images_whole(docs, max_len):
    out = build_retrieval_prefix(docs, vocab=V, max_len=max_len)
    assert out.size <= max_len
    assert _images_whole(out)
    if out.size:
        assert out[-1] == EOS
    # the prefix is docs[0] + sep + docs[1] + sep ... with only the last one possibly cut short
    pieces = np.split(out, np.flatnonzero(out == EOS) + 1)[:-1]
    bodies = [d[:-1] for d in docs]
    assert len(pieces) <= len(bodies)
    for j, p in enumerate(pieces):
        body = p[:-1]
        assert body.tolist() == bodies[j][:body.size].tolist()
        if j < len(pieces) - 1:
            assert body.size == bodies[j].size
    # greedy: if everything fits, everything is there
    if sum(b.size + 1 for b in bodies) <= max_len:
        assert len(pieces) == len(bodies) and all(p.size - 1 == b.size for p, b in zip(pieces, bodies))


@settings(max_examples=80, deadline=None)
@given(seq=document, docs=st.lists(document, max_size=3), extra=st.integers(0, 30))
def test_prepend_fits_context(seq, docs, extra):
    context = seq.size + extra
    tokens, is_prefix = prepend_retrieved(seq, docs, vocab=V, context=context)
    assert tokens.size <= context
    assert tokens[~is_prefix].tolist() == seq.tolist()

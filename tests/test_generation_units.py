"""Model-free parts of generation: sampling, the mixed-modal state machine, CFG, answers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jam_metaseq.generation.answer import Answer, ImageSegment, TextSegment, open_image_codes, split_segments
from jam_metaseq.generation.cfg import blend, unconditional_prompt
from jam_metaseq.generation.sampling import (
    SamplingConfig, apply_repetition_penalty, filter_top_k_top_p, row_uniform, sample,
)
from jam_metaseq.generation.state import CLOSE, DONE, IMAGE, TEXT, MixedModalRules, MixedModalState
from jam_metaseq.vocab import tiny_manifest

VOCAB = tiny_manifest()  # 64 text ids, 32 image codes, 2x2 grid: an image is 4 tokens
N = VOCAB.image_tokens_per_image


# ---- sampling -------------------------------------------------------------------------------------
def test_row_uniform_is_a_function_of_seed_and_step_only():
    u = row_uniform(torch.tensor([7, 11, 13]), 5)
    assert u.shape == (3,) and bool((u > 0).all()) and bool((u < 1).all())
    assert torch.equal(row_uniform(torch.tensor([11]), 5)[0], u[1])  # batch composition does not matter
    assert torch.equal(row_uniform(torch.tensor([7, 11, 13]), 5), u)
    assert row_uniform(torch.tensor([7]), 6)[0] != u[0]  # step matters
    assert u[0] != u[2]  # seed matters


def test_row_uniform_is_uniform_and_steps_are_uncorrelated():
    seeds = torch.arange(100_000)
    u = row_uniform(seeds, 3)
    counts = torch.histc(u, bins=10, min=0, max=1)
    expected = u.numel() / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 40, chi2  # 9 dof: p < 1e-5 for a fair generator
    assert abs(float(u.mean()) - 0.5) < 0.005
    v = row_uniform(seeds, 4)
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 0.02
    w = row_uniform(seeds + 1, 3)  # neighbouring seeds
    assert abs(float(torch.corrcoef(torch.stack([u, w]))[0, 1])) < 0.02


def test_sample_matches_softmax_frequencies():
    logits = torch.tensor([1.0, 2.0, 0.0, -1.0, 3.0])
    B = 40000
    tokens = sample(
        logits.expand(B, -1), seeds=torch.arange(B), step=0, temperature=torch.full((B,), 0.7),
    )
    freq = torch.bincount(tokens, minlength=5).float() / B
    expected = (logits / 0.7).softmax(-1)
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)


def test_sample_temperature_zero_is_argmax_and_minus_inf_is_never_drawn():
    logits = torch.tensor([[0.0, 5.0, 1.0], [2.0, float("-inf"), 1.9]])
    for s in range(20):
        greedy = sample(logits, seeds=torch.tensor([s, s]), step=s, temperature=torch.zeros(2))
        assert greedy.tolist() == [1, 0]
        hot = sample(logits, seeds=torch.tensor([s, s]), step=s, temperature=torch.full((2,), 5.0))
        assert hot[1].item() != 1


def test_top_k_and_top_p_hand_cases():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    out = filter_top_k_top_p(logits, top_k=torch.tensor([2]), top_p=torch.tensor([1.0]))
    assert torch.isfinite(out).tolist() == [[False, True, True, False]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    lg = probs.log()
    keep = lambda p: torch.isfinite(filter_top_k_top_p(lg, top_k=torch.tensor([0]), top_p=torch.tensor([p])))
    assert keep(0.8).tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8
    assert keep(0.81).tolist() == [[True, True, True, False]]
    assert keep(0.1).tolist() == [[True, False, False, False]]  # the top token always survives


@settings(max_examples=60, deadline=None)
@given(
    logits=st.lists(st.floats(-5, 5), min_size=2, max_size=12),
    top_p=st.floats(0.05, 1.0),
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(logits, top_p):
    lg = torch.tensor([logits], dtype=torch.float64)
    kept = torch.isfinite(filter_top_k_top_p(lg, top_k=torch.tensor([0]), top_p=torch.tensor([top_p])))[0]
    probs = lg.softmax(-1)[0]
    order = probs.argsort(descending=True)
    # Independent reference: walk down the sorted probabilities until the mass reaches top_p.
    mass, need = 0.0, 0
    for i in order.tolist():
        need += 1
        mass += float(probs[i])
        if mass >= top_p - 1e-12:
            break
    assert int(kept.sum()) == need or math.isclose(mass, top_p, abs_tol=1e-6)
    # Whatever is kept is at least as likely as whatever is dropped.
    if (~kept).any():
        assert float(probs[kept].min()) >= float(probs[~kept].max()) - 1e-12


def test_repetition_penalty_hand_case():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen=seen, penalty=2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_sampling_config_validates():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)


# ---- CFG --------------------------------------------------------------------------------------------
def test_unconditional_prompt_replaces_text_runs_by_one_mask():
    t0, t1, t2 = (VOCAB.text_start + i for i in range(3))
    img = VOCAB.image_start
    b, m = VOCAB.break_id, VOCAB.mask_id
    assert unconditional_prompt([VOCAB.bos, t0, t1, t2], vocab=VOCAB) == [VOCAB.bos, m]
    assert unconditional_prompt([t0, b, img, img + 1, img, img, b, t1, t2, b], vocab=VOCAB) == [
        m, b, img, img + 1, img, img, b, m, b
    ]
    assert unconditional_prompt([VOCAB.bos, b], vocab=VOCAB) == [VOCAB.bos, b]


def test_blend_is_equation_6():
    cond = torch.tensor([[1.0, 2.0, -1.0]])
    uncond = torch.tensor([[0.5, 0.0, 1.0]])
    assert torch.allclose(blend(cond, uncond, alpha=3.5), torch.tensor([[2.25, 7.0, -6.0]]))
    assert blend(cond, uncond, alpha=1.0) is cond
    assert blend(cond, uncond, alpha=0.0) is uncond


# ---- the state machine ----------------------------------------------------------------------------
def rules(**kw) -> MixedModalRules:
    return MixedModalRules.from_vocab(VOCAB, **{"max_new_tokens": 40, **kw})


def test_state_walks_text_image_close_text_done():
    st_ = MixedModalState(rules(), [[VOCAB.bos, VOCAB.text_start]])
    t, b, img = VOCAB.text_start + 5, VOCAB.break_id, VOCAB.image_start + 3
    allowed = st_.allowed()[0]
    assert allowed[t] and allowed[b] and allowed[VOCAB.eos]
    assert not allowed[img] and not allowed[VOCAB.pad] and not allowed[VOCAB.mask_id]
    script = [t, b, img, img, img, img, b, t, VOCAB.eos]
    modes = []
    for tok in script:
        assert st_.allowed()[0, tok], (tok, st_.mode)
        st_.advance(torch.tensor([tok]))
        modes.append(int(st_.mode[0]))
    assert modes == [TEXT, IMAGE, IMAGE, IMAGE, IMAGE, CLOSE, TEXT, TEXT, DONE]
    assert int(st_.images[0]) == 1 and bool(st_.hit_eos[0]) and int(st_.generated[0]) == len(script)
    assert st_.forced().tolist() == [VOCAB.pad]


def test_state_image_rows_allow_only_codes_and_close_is_forced():
    st_ = MixedModalState(rules(), [[VOCAB.break_id]])  # prompt opens an image
    assert st_.mode.tolist() == [IMAGE]
    allowed = st_.allowed()[0]
    assert allowed.nonzero().flatten().tolist() == list(VOCAB.image_range)
    for _ in range(N):
        st_.advance(torch.tensor([VOCAB.image_start]))
    assert st_.forced().tolist() == [VOCAB.break_id]
    assert st_.allowed()[0].nonzero().flatten().tolist() == [VOCAB.break_id]


def test_state_limits_forbid_force_and_fit():
    no_images = MixedModalState(rules(max_images=0), [[VOCAB.bos]])
    assert not no_images.allowed()[0, VOCAB.break_id]
    needs_one = MixedModalState(rules(min_images=1), [[VOCAB.bos]])
    assert not needs_one.allowed()[0, VOCAB.eos]
    first = MixedModalState(rules(force_image_first=True), [[VOCAB.bos]])
    assert first.forced().tolist() == [VOCAB.break_id]
    # N + 2 tokens left: an image still fits; N + 1: it does not.
    tight = MixedModalState(rules(max_new_tokens=N + 1), [[VOCAB.bos]])
    assert not tight.allowed()[0, VOCAB.break_id]
    fits = MixedModalState(rules(max_new_tokens=N + 2, min_images=1), [[VOCAB.bos]])
    assert fits.forced().tolist() == [VOCAB.break_id]  # min_images forces the last chance


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    max_new=st.integers(1, 30),
    max_images=st.integers(0, 3),
    min_images=st.integers(0, 2),
    first=st.booleans(),
)
def test_any_path_through_the_state_machine_is_well_formed(seed, max_new, max_images, min_images, first):
    min_images = min(min_images, max_images)
    r = rules(max_new_tokens=max_new, max_images=max_images, min_images=min_images, force_image_first=first)
    B = 4
    st_ = MixedModalState(r, [[VOCAB.bos]] * B)
    out = []
    # Random logits, rows pick any allowed token: the constraints alone must keep answers valid.
    for step in range(max_new):
        raw = torch.randn(B, VOCAB.size, generator=torch.Generator().manual_seed(seed + step))
        raw[:, VOCAB.break_id] += 4.0  # make the model want images often
        logits = st_.constrain(raw)
        tok = sample(logits, seeds=torch.arange(B) + seed, step=step, temperature=torch.full((B,), 3.0))
        forced = st_.forced()
        tok = torch.where(forced >= 0, forced, tok)
        st_.advance(tok)
        out.append(tok)
    ids = torch.stack(out, 1)
    for b in range(B):
        row = ids[b, : int(st_.generated[b])].tolist()
        assert len(row) <= max_new
        assert VOCAB.pad not in row
        if VOCAB.eos in row:
            assert row.index(VOCAB.eos) == len(row) - 1
        segs = split_segments(row, vocab=VOCAB)
        images = [s for s in segs if isinstance(s, ImageSegment)]
        assert all(s.complete for s in images), row  # never a truncated image
        assert len(images) <= max_images
        assert row.count(VOCAB.break_id) == 2 * len(images)
        if bool(st_.hit_eos[b]):  # owed images are forced while they fit
            assert len(images) >= min(min_images, max_new // (N + 2))
        if first and max_new >= N + 2 and max_images > 0:
            assert row[0] == VOCAB.break_id
        # Between the two <break>s of an image: exactly N image codes, nothing else.
        i = 0
        while i < len(row):
            if row[i] == VOCAB.break_id:
                body = row[i + 1 : i + 1 + N]
                assert len(body) == N and all(VOCAB.is_image(t) for t in body)
                assert row[i + 1 + N] == VOCAB.break_id
                i += N + 2
            else:
                assert VOCAB.is_text(row[i]) or row[i] == VOCAB.eos
                i += 1


# ---- answers ---------------------------------------------------------------------------------------
def test_split_segments_and_json_round_trip():
    t = VOCAB.text_start
    img = VOCAB.image_start
    ids = [t + 1, t + 2, VOCAB.break_id, img, img + 1, img + 2, img + 3, VOCAB.break_id, t + 3, VOCAB.eos]
    segs = split_segments(ids, vocab=VOCAB)
    assert [type(s) for s in segs] == [TextSegment, ImageSegment, TextSegment]
    assert segs[0].ids == [1, 2] and segs[2].ids == [3]
    assert segs[1].codes == [[0, 1], [2, 3]] and segs[1].complete
    cut = split_segments([VOCAB.break_id, img + 5], vocab=VOCAB)
    assert cut[0].codes == [[5, -1], [-1, -1]] and not cut[0].complete
    prompt = [VOCAB.bos, VOCAB.break_id, img + 7]
    assert open_image_codes(prompt, vocab=VOCAB) == [7]
    cont = split_segments([img + 1, img + 2, img + 3, VOCAB.break_id], vocab=VOCAB, open_image=[7])
    assert cont[0].codes == [[7, 1], [2, 3]] and cont[0].complete
    ans = Answer(prompt_ids=[0, t], ids=ids, finish_reason="eos", seed=3, segments=segs, prompt="hi")
    again = Answer.from_dict(json.loads(json.dumps(ans.to_dict())))
    assert again == ans

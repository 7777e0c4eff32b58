"""The generation engine on tiny random models of every architecture (paper §3.1, Eq. 6).

Tests that compare tokens between computations of different shapes use float64 copies of the
models (``_generation_util.float64``); the float32 logits are compared with a tolerance."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from _generation_util import ARCHS, PROMPTS, T0, VOCAB, float64, one_thread, tiny_config  # noqa: F401
from jam_metaseq.generation.answer import ImageSegment
from jam_metaseq.generation.cfg import unconditional_prompt
from jam_metaseq.generation.engine import Engine, GenerationConfig
from jam_metaseq.generation.sampling import SamplingConfig
from jam_metaseq.models import build_model

N = VOCAB.image_tokens_per_image


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    torch.manual_seed(0)
    return build_model(tiny_config(request.param)).eval()


@pytest.fixture(scope="module")
def decoder_model():
    torch.manual_seed(1)
    return build_model(tiny_config("decoder")).eval()


@pytest.fixture(scope="module")
def model64(model):
    return float64(model)


@pytest.fixture(scope="module")
def decoder64(decoder_model):
    return float64(decoder_model)


GREEDY = SamplingConfig(temperature=0.0)


def config(**kw) -> GenerationConfig:
    return GenerationConfig(**{"max_new_tokens": 24, "min_images": 1, **kw})


def test_cached_logits_equal_the_full_forward(model):
    """Left-padded prefill + one-token steps reproduce the uncached forward's last logits."""
    rows = [PROMPTS[0] + [T0 + 4, T0 + 8, T0 + 1, T0 + 2], [VOCAB.pad] * 3 + PROMPTS[1] + [T0 + 6, T0 + 2, T0 + 1]]
    tokens = torch.tensor(rows)
    with torch.no_grad():
        full = model(tokens)  # (2, T, V)
        cache = model.setup_caches(2, tokens.shape[1])
        pre = model(tokens[:, :-3], cache=cache)
        steps = [model(tokens[:, i : i + 1], cache=cache)[:, 0] for i in range(tokens.shape[1] - 3, tokens.shape[1])]
    assert torch.allclose(pre[:, -1], full[:, -4], atol=1e-4)
    for k, step in enumerate(steps):
        assert torch.allclose(step, full[:, -3 + k], atol=1e-4)
    # The padded row equals that row run alone.
    with torch.no_grad():
        alone = model(torch.tensor([rows[1][3:]]))
    assert torch.allclose(alone[0, -1], full[1, -1], atol=1e-4)


def test_cached_greedy_equals_uncached(model64):
    cfg = config(text=GREEDY, image=GREEDY, guidance_scale=3.5)
    cached = Engine(model64, vocab=VOCAB).generate(PROMPTS, config=cfg)
    uncached = Engine(model64, vocab=VOCAB, use_cache=False).generate(PROMPTS, config=cfg)
    assert [a.ids for a in cached] == [a.ids for a in uncached]
    assert all(a.images for a in cached)


def test_sliced_image_logits_change_nothing(model64):
    cfg = config(max_new_tokens=30, min_images=2)
    fast = Engine(model64, vocab=VOCAB).generate(PROMPTS, config=cfg, seeds=[3, 4, 5])
    full = Engine(model64, vocab=VOCAB, slice_image_logits=False).generate(PROMPTS, config=cfg, seeds=[3, 4, 5])
    assert [a.ids for a in fast] == [a.ids for a in full]


def test_images_are_exactly_n_codes_framed_by_break(model):
    answers = Engine(model, vocab=VOCAB).generate(
        PROMPTS, config=config(max_new_tokens=40, min_images=2, max_images=3), seeds=[1, 2, 3]
    )
    for a in answers:
        images = [s for s in a.segments if isinstance(s, ImageSegment)]
        assert 2 <= len(images) <= 3 and all(s.complete for s in images)
        ids = a.ids
        starts = [i for i, t in enumerate(ids) if t == VOCAB.break_id][::2]
        for s in starts:
            assert all(VOCAB.is_image(t) for t in ids[s + 1 : s + 1 + N])
            assert ids[s + 1 + N] == VOCAB.break_id
        assert ids.count(VOCAB.break_id) == 2 * len(images)
        assert sum(VOCAB.is_image(t) for t in ids) == N * len(images)


def test_same_seed_same_answer_and_batch_equals_alone(decoder64):
    engine = Engine(decoder64, vocab=VOCAB)
    cfg = config(max_new_tokens=30)
    batch = engine.generate(PROMPTS, config=cfg, seeds=[11, 12, 13])
    again = engine.generate(PROMPTS, config=cfg, seeds=[11, 12, 13])
    assert [a.ids for a in batch] == [a.ids for a in again]
    for p, s, a in zip(PROMPTS, [11, 12, 13], batch):
        alone = engine.generate([p], config=cfg, seeds=[s])[0]
        assert alone.ids == a.ids
    other = engine.generate(PROMPTS, config=cfg, seeds=[21, 22, 23])
    assert [a.ids for a in other] != [a.ids for a in batch]


def test_guidance_scale_one_is_conditional_and_zero_is_unconditional(decoder64):
    engine = Engine(decoder64, vocab=VOCAB)
    # Text-to-image: the answer is one image, so every step is guided.
    base = dict(max_new_tokens=N + 2, force_image_first=True, max_images=1)
    seeds = [5, 6, 7]
    plain_cond = engine.generate(PROMPTS, config=config(guidance=False, **base), seeds=seeds)
    alpha1 = engine.generate(PROMPTS, config=config(guidance_scale=1.0, **base), seeds=seeds)
    assert [a.ids for a in alpha1] == [a.ids for a in plain_cond]
    uncond_prompts = [unconditional_prompt(p, vocab=VOCAB) for p in PROMPTS]
    plain_uncond = engine.generate(uncond_prompts, config=config(guidance=False, **base), seeds=seeds)
    alpha0 = engine.generate(PROMPTS, config=config(guidance_scale=0.0, **base), seeds=seeds)
    assert [a.ids for a in alpha0] == [a.ids for a in plain_uncond]
    # Negative control: guidance changes the images.
    alpha4 = engine.generate(PROMPTS, config=config(guidance_scale=4.0, **base), seeds=seeds)
    assert [a.ids for a in alpha4] != [a.ids for a in plain_cond]
    # Text steps are not guided: with a text answer and no images, alpha does not matter.
    text_only = dict(max_new_tokens=12, max_images=0, min_images=0)
    assert [a.ids for a in engine.generate(PROMPTS, config=config(guidance_scale=4.0, **text_only), seeds=seeds)] == [
        a.ids for a in engine.generate(PROMPTS, config=config(guidance=False, **text_only), seeds=seeds)
    ]


def test_forbid_images_and_eos_finishes(decoder_model):
    engine = Engine(decoder_model, vocab=VOCAB)
    answers = engine.generate(PROMPTS, config=config(max_new_tokens=30, max_images=0, min_images=0), seeds=[1, 2, 3])
    for a in answers:
        assert VOCAB.break_id not in a.ids and not a.images
        assert a.finish_reason == ("eos" if a.ids and a.ids[-1] == VOCAB.eos else "length")
        assert len(a.ids) <= 30


def test_prompt_that_opens_an_image_is_completed(decoder_model):
    prompt = [VOCAB.bos, T0 + 3, VOCAB.break_id, VOCAB.image_start + 2]
    a = Engine(decoder_model, vocab=VOCAB).generate([prompt], config=config(max_new_tokens=8, min_images=0))[0]
    assert all(VOCAB.is_image(t) for t in a.ids[: N - 1]) and a.ids[N - 1] == VOCAB.break_id
    assert a.segments[0].codes[0][0] == 2 and a.segments[0].complete


def test_clear_errors(decoder_model):
    engine = Engine(decoder_model, vocab=VOCAB)
    with pytest.raises(ValueError, match="context holds 96"):
        engine.generate([[VOCAB.bos] + [T0] * 100], config=config())
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[VOCAB.bos, 10_000]], config=config())
    other = dataclasses.replace(VOCAB, text_size=200)
    with pytest.raises(ValueError, match=f"{other.size} ids but the model's embedding has {VOCAB.size}"):
        Engine(decoder_model, vocab=other)


def test_prompt_near_the_context_gets_a_smaller_budget(decoder_model):
    long_prompt = [VOCAB.bos] + [T0 + 1] * 90  # 91 of 96 positions: 5 left, no image fits
    a, b = Engine(decoder_model, vocab=VOCAB).generate([long_prompt, PROMPTS[1]], config=config(max_new_tokens=20))
    assert len(a.ids) <= 5 and not a.images
    assert len(b.ids) <= 20

"""Static-shape decode steps and their CUDA graphs (``generation/static.py``) against the eager loop,
on tiny random models of every architecture (paper §3.1): same logits, same tokens for the same
seeds, keys past the written length never attended, no host sync inside a step. The CUDA tests run
only where a GPU is present.

Logits are compared in float32 with a tolerance; tokens of the eager and static modes (different
computation shapes) on float64 copies of the models (``_generation_util.float64``)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _generation_util import ARCHS, FAMILY_ARCHS, PROMPTS, T0, VOCAB, float64, one_thread, tiny_config  # noqa: F401
from _model_util import randomize_
from jam_metaseq.generation.engine import Engine, GenerationConfig
from jam_metaseq.generation.sampling import SamplingConfig
from jam_metaseq.generation.state import CLOSE, DONE, IMAGE, TEXT, MixedModalRules, MixedModalState
from jam_metaseq.generation.static import plan
from jam_metaseq.models import build_model

N = VOCAB.image_tokens_per_image
IMAGE_COLUMNS = (VOCAB.image_start, VOCAB.image_end)
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    torch.manual_seed(0)
    return build_model(tiny_config(request.param)).eval()


@pytest.fixture(scope="module")
def model64(model):
    return float64(model)


def engine(model, decode: str, **kw) -> Engine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # graph off CUDA: tested below
        return Engine(model, vocab=VOCAB, decode=decode, **kw)


def padded_rows() -> torch.Tensor:
    """Three left-padded prompts and their CFG rows: (6, T)."""
    from jam_metaseq.generation.cfg import unconditional_prompt

    rows = PROMPTS + [unconditional_prompt(p, vocab=VOCAB) for p in PROMPTS]
    T = max(map(len, rows))
    return torch.tensor([[VOCAB.pad] * (T - len(r)) + r for r in rows])


GENERATION_CASES = {
    "cfg, text and two images": dict(max_new_tokens=40, min_images=2),
    "no guidance": dict(max_new_tokens=30, min_images=1, guidance=False),
    "greedy": dict(max_new_tokens=24, min_images=1, text=SamplingConfig(temperature=0.0),
                   image=SamplingConfig(temperature=0.0)),
    "top-k, penalty, text-to-image": dict(max_new_tokens=N + 6, force_image_first=True,
                                         text=SamplingConfig(top_k=5, repetition_penalty=1.3)),
    "text only, done early": dict(max_new_tokens=30, max_images=0, check_done_every=3),
}


# ---- logits --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS + FAMILY_ARCHS)
@pytest.mark.parametrize("key_block", [0, 4, 256])
def test_static_steps_give_the_eager_logits(arch, key_block):
    """Prefill of left-padded CFG rows, then one-token steps (some all-columns, some image-only)."""
    torch.manual_seed(0)
    # Every weight random at std 0.1 (as in test_models_cache): cross blocks and LayerNorms all active.
    model = randomize_(build_model(tiny_config(arch)), seed=11).eval()
    tokens = padded_rows()
    R, T = tokens.shape
    feeds = [T0 + 4, VOCAB.break_id, VOCAB.image_start + 3, VOCAB.image_start + 9, VOCAB.break_id, T0 + 1, VOCAB.eos]
    columns = [None, None, IMAGE_COLUMNS, IMAGE_COLUMNS, IMAGE_COLUMNS, None, None]
    logits = {}
    for decode in ("eager", "static"):
        e = engine(model, decode, key_block=key_block)
        with torch.inference_mode():
            e.setup_caches(batch_size=R, max_len=T + len(feeds))
            got = [e.prefill(tokens)]
            for t, c in zip(feeds, columns):
                feed = torch.full((R, 1), t)
                feed[1, 0] = VOCAB.pad  # a finished row is fed <pad>
                got.append(e.decode_one_token(feed, columns=c))
        logits[decode] = got
    for a, b in zip(logits["eager"], logits["static"]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(GENERATION_CASES))
def test_static_and_graph_modes_generate_the_eager_tokens(model64, name):
    cfg = GenerationConfig(**GENERATION_CASES[name])
    seeds = [7, 8, 9]
    eager = [a.ids for a in engine(model64, "eager").generate(PROMPTS, config=cfg, seeds=seeds)]
    for decode, key_block in (("static", 256), ("static", 8), ("static", 0), ("graph", 16)):
        e = engine(model64, decode, key_block=key_block)
        assert [a.ids for a in e.generate(PROMPTS, config=cfg, seeds=seeds)] == eager, (decode, key_block)
        # The second call reuses the cache and buffers of the first.
        assert [a.ids for a in e.generate(PROMPTS, config=cfg, seeds=seeds)] == eager, (decode, key_block)
    # Negative control: other seeds, other answers.
    other = [a.ids for a in engine(model64, "static").generate(PROMPTS, config=cfg, seeds=[1, 2, 3])]
    assert other != eager or name == "greedy"


def test_a_static_engine_serves_calls_of_other_sizes(model64):
    """Batch sizes, guidance and lengths change between calls: the buffers follow."""
    e = engine(model64, "static", key_block=8)
    ref = engine(model64, "eager")
    for prompts, kw in ((PROMPTS, dict(max_new_tokens=30, min_images=1)), (PROMPTS[:1], dict(max_new_tokens=12)),
                        (PROMPTS, dict(max_new_tokens=N + 3, force_image_first=True, guidance=False))):
        cfg = GenerationConfig(**kw)
        assert [a.ids for a in e.generate(prompts, config=cfg)] == [a.ids for a in ref.generate(prompts, config=cfg)]


# ---- keys past the length --------------------------------------------------------------------------
def poisoned_step_logits(model, tokens: torch.Tensor, feeds: list[int], *, poison: float | None, where: str,
                         seed: int = 0) -> torch.Tensor:
    """Static one-token steps after a prefill, with the cache region ``where`` ("unused": past the
    written length; "used": the first written key) overwritten by +-``poison`` first."""
    R, T = tokens.shape
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.inference_mode():
        cache = model.setup_caches(R, T + len(feeds) + 5)
        model(tokens, cache=cache)
        for t in feeds:
            if poison is not None:
                region = slice(cache.length + 1, None) if where == "unused" else slice(0, 1)
                for buf in (cache.k, cache.v):
                    noise = torch.randn(buf[..., region, :].shape, generator=g)
                    buf[..., region, :] = poison * noise.sign()
                # Marks on unwritten keys are noise too: only the causal mask may hide them.
                if where == "unused":
                    cache.key_padding[:, region] = torch.rand(cache.key_padding[:, region].shape, generator=g) < 0.5
            out.append(model(torch.full((R, 1), t), cache=cache, span=cache.max_len)[:, 0])
    return torch.stack(out)


def test_keys_past_the_length_are_never_attended(model):
    tokens = padded_rows()
    feeds = [T0 + 4, VOCAB.break_id, VOCAB.image_start + 3]
    clean = poisoned_step_logits(model, tokens, feeds, poison=None, where="unused")
    for poison in (1e4, 1e30):
        torch.testing.assert_close(
            poisoned_step_logits(model, tokens, feeds, poison=poison, where="unused"), clean, atol=1e-5, rtol=0
        )
    # Control: the same poison on a key that is attended changes the logits.
    used = poisoned_step_logits(model, tokens, feeds, poison=1e4, where="used")
    assert (used - clean).abs().max() > 1.0


@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    feeds=st.lists(st.integers(0, VOCAB.size - 1), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_poisoned_unused_cache_changes_nothing_property(lengths, feeds, seed):
    """Any left padding, any fed tokens (``<pad>`` included), any poison past the length."""
    torch.manual_seed(0)
    model = build_model(tiny_config("decoder")).eval()
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    tokens = torch.full((len(lengths), T), VOCAB.pad)
    for i, n in enumerate(lengths):
        tokens[i, T - n:] = torch.randint(4, VOCAB.size, (n,), generator=g)
    clean = poisoned_step_logits(model, tokens, feeds, poison=None, where="unused")
    dirty = poisoned_step_logits(model, tokens, feeds, poison=1e6, where="unused", seed=seed)
    torch.testing.assert_close(dirty, clean, atol=1e-5, rtol=0)


# ---- the plan and the step -------------------------------------------------------------------------
def test_plan_hand_cases():
    kw = dict(image_tokens=16, image_columns=IMAGE_COLUMNS, check_done_every=4)
    # Two rows inside an image: 16 - 3 and 16 - 10 codes left -> 6 image-only steps.
    assert plan(mode=[IMAGE, IMAGE], image_pos=[3, 10], left=[40, 40], forced=[False, False], **kw) == (IMAGE_COLUMNS, 6)
    # A row short of budget ends first; a DONE row (forced <pad>) never limits.
    assert plan(mode=[IMAGE, DONE], image_pos=[3, 0], left=[2, 0], forced=[False, True], **kw) == (IMAGE_COLUMNS, 2)
    # A forced closing <break> is an image-column step, but the next one is text: one step.
    assert plan(mode=[CLOSE, IMAGE], image_pos=[16, 3], left=[9, 9], forced=[True, False], **kw) == (IMAGE_COLUMNS, 1)
    # A free text row: all columns, and its token decides the next step.
    assert plan(mode=[TEXT, IMAGE], image_pos=[0, 3], left=[9, 9], forced=[False, False], **kw) == (None, 1)
    # Without column slicing only the done check matters.
    assert plan(mode=[TEXT], image_pos=[0], left=[9], forced=[False], **{**kw, "image_columns": None}) == (None, 4)
    assert plan(mode=[DONE, DONE], image_pos=[0, 0], left=[0, 0], forced=[True, True], **kw) is None


def test_plan_agrees_with_the_state_machine():
    """For every planned stretch, stepping the real state keeps every row image-or-forced throughout."""
    rules = MixedModalRules.from_vocab(VOCAB, vocab_size=VOCAB.size, max_new_tokens=40, max_images=2)
    state = MixedModalState(rules, [[VOCAB.bos, VOCAB.break_id], [VOCAB.bos, VOCAB.break_id, VOCAB.image_start]])
    g = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(30):
        mode, pos, left = state.mode.tolist(), state.image_pos.tolist(), (state.limit - state.generated).tolist()
        forced = (state.forced() >= 0).tolist()
        planned = plan(mode=mode, image_pos=pos, left=left, forced=forced, image_tokens=N,
                       image_columns=IMAGE_COLUMNS, check_done_every=1)
        if planned is None:
            break
        columns, n = planned
        for _ in range(n):
            if columns is not None:
                assert bool(((state.mode == IMAGE) | (state.forced() >= 0)).all())
                checked += 1
            allowed = state.allowed()
            tokens = torch.multinomial(allowed.float(), 1, generator=g)[:, 0]
            state.advance(tokens)
    assert checked >= N


@contextmanager
def no_python_syncs():
    """Make the Python-level ways of reading a tensor on the host raise."""
    names = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(self, *args, **kwargs):
        raise AssertionError("host sync inside a static step")

    try:
        for n in names:
            setattr(torch.Tensor, n, refuse)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_a_static_step_reads_nothing_back(model):
    e = engine(model, "static", key_block=8)
    cfg = GenerationConfig(max_new_tokens=30, min_images=1, text=SamplingConfig(top_k=5, repetition_penalty=1.2))
    steps = []
    real = e.static._body

    def guarded(**kw):
        with no_python_syncs():
            real(**kw)
        steps.append(kw["columns"])

    e.static._body = guarded
    e.generate(PROMPTS, config=cfg)
    assert None in steps and IMAGE_COLUMNS in steps  # text and image steps both ran guarded
    # Control: the guard does catch a sync.
    with pytest.raises(AssertionError, match="host sync"), no_python_syncs():
        bool(torch.ones(1))


# ---- graph mode off CUDA, and options ------------------------------------------------------------------
def test_graph_mode_off_cuda_falls_back_to_static_with_a_warning():
    torch.manual_seed(0)
    cpu_model = build_model(tiny_config("decoder")).eval().double()
    with pytest.warns(RuntimeWarning, match="needs a CUDA device"):
        e = Engine(cpu_model, vocab=VOCAB, decode="graph")
    assert e.decode_mode == "static"
    cfg = GenerationConfig(max_new_tokens=20, min_images=1)
    assert [a.ids for a in e.generate(PROMPTS, config=cfg)] == [
        a.ids for a in Engine(cpu_model, vocab=VOCAB).generate(PROMPTS, config=cfg)
    ]


def test_option_errors(model):
    with pytest.raises(ValueError, match="decode must be one of"):
        Engine(model, vocab=VOCAB, decode="fast")
    with pytest.raises(ValueError, match="needs the KV cache"):
        Engine(model, vocab=VOCAB, decode="static", use_cache=False)
    with pytest.raises(ValueError, match="key_block"):
        Engine(model, vocab=VOCAB, decode="static", key_block=-1)


def test_span_must_cover_the_chunk(model):
    with torch.inference_mode():
        cache = model.setup_caches(1, 8)
        model(torch.tensor([[VOCAB.bos, T0, T0 + 1]]), cache=cache)
        with pytest.raises(ValueError, match="span 3 must cover the 4 keys"):
            model(torch.tensor([[T0]]), cache=cache, span=3)


# ---- CUDA ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=ARCHS + FAMILY_ARCHS)
def cuda_model(request):
    torch.manual_seed(0)
    return build_model(tiny_config(request.param)).eval().cuda()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(GENERATION_CASES))
def test_cuda_graph_mode_generates_the_eager_tokens(cuda_model, name):
    cfg = GenerationConfig(**GENERATION_CASES[name])
    seeds = [7, 8, 9]
    m = float64(cuda_model)  # eager and static/graph steps differ in shape: tokens compared in float64
    eager = [a.ids for a in Engine(m, vocab=VOCAB).generate(PROMPTS, config=cfg, seeds=seeds)]
    static = [a.ids for a in Engine(m, vocab=VOCAB, decode="static").generate(PROMPTS, config=cfg, seeds=seeds)]
    e = Engine(m, vocab=VOCAB, decode="graph", key_block=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a capture failure (fallback warning) fails the test
        graph = [a.ids for a in e.generate(PROMPTS, config=cfg, seeds=seeds)]
        captured = len(e.static.graphs)
        again = [a.ids for a in e.generate(PROMPTS, config=cfg, seeds=seeds)]
    assert e.decode_mode == "graph" and e.static.graph_replays > 0 and captured > 0
    assert len(e.static.graphs) == captured  # the second call replays the first call's graphs
    assert static == eager and graph == eager and again == eager


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_graph_equals_static_in_bfloat16():
    """bf16: the graph replays the static step's kernels, so the tokens agree exactly."""
    torch.manual_seed(0)
    m = build_model(tiny_config("cross")).eval().cuda().to(torch.bfloat16)
    cfg = GenerationConfig(max_new_tokens=40, min_images=2)
    static = [a.ids for a in Engine(m, vocab=VOCAB, decode="static").generate(PROMPTS, config=cfg)]
    e = Engine(m, vocab=VOCAB, decode="graph")
    assert [a.ids for a in e.generate(PROMPTS, config=cfg)] == static and e.decode_mode == "graph"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_static_step_does_not_synchronize(cuda_model):
    e = Engine(cuda_model, vocab=VOCAB, decode="static")
    real = e.static._body
    caught = []

    def guarded(**kw):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                real(**kw)
            caught.extend(str(x.message) for x in w)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    e.static._body = guarded
    e.generate(PROMPTS, config=GenerationConfig(max_new_tokens=30, min_images=1))
    assert not [m for m in caught if "synchroniz" in m.lower()], caught[:3]

"""A conversation that keeps its KV cache (issue 25 item 3): every turn's tokens equal a
from-scratch ``Engine.generate`` on the whole history (unconditional row: the history with the
current user turn's text masked), each history token goes through the model once, in eager and
static decode modes (and CUDA-graph mode equal to eager, on a GPU); stopped turns, dropped images
and dropped old exchanges keep that true."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from _generation_util import float64, one_thread, tiny_config  # noqa: F401
from jam_metaseq.generation.cfg import unconditional_prompt
from jam_metaseq.generation.conversation import Conversation, ImageDone, ImageStarted, TextDelta, TurnDone
from jam_metaseq.generation.engine import Engine, GenerationConfig
from jam_metaseq.generation.sampling import SamplingConfig
from jam_metaseq.models import build_model
from jam_metaseq.vocab import tiny_manifest

V = tiny_manifest(conversation_tokens=True)
T0 = V.text_start
IMAGE = [V.break_id, *(V.image_start + c for c in (3, 1, 4, 1)), V.break_id]
USER_TURNS = [[T0 + 5, T0 + 9, T0 + 2], [T0 + 7, *IMAGE, T0 + 3], [T0 + 1, T0 + 1, T0 + 8, T0 + 4]]
GREEDY = SamplingConfig(temperature=0.0)


def chat_config(**kw) -> GenerationConfig:
    return GenerationConfig(**{"max_new_tokens": 14, "min_images": 1, "text": GREEDY, "image": GREEDY,
                               "guidance_scale": 3.5, **kw})


@pytest.fixture(scope="module", params=["decoder", "cross"])
def model64(request):
    torch.manual_seed(3)
    return float64(build_model(tiny_config(request.param, vocab=V)).eval())


class PositionCounter:
    """Records the (rows, positions) of every forward pass the model makes (a hook on the token
    embedding, independent of the code under test)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[tuple[int, int]] = []
        self.handle = model.decoder.embed_tokens.register_forward_hook(
            lambda _m, args, _out: self.calls.append(tuple(args[0].shape)))

    def close(self) -> None:
        self.handle.remove()


def from_scratch(model, history: list[int], turn: list[int], *, config: GenerationConfig, seed: int,
                 masked: bool = True) -> list[int]:
    """The reference: one ``generate`` call on the whole history + turn, a fresh cache."""
    cfg = dataclasses.replace(config, end_id=V.eot)
    prompt = history + turn
    uncond = None
    if config.guidance and masked:
        uncond = [history + turn[:1] + unconditional_prompt(turn[1:], vocab=V)]
    ids = Engine(model, vocab=V).generate([prompt], config=cfg, seeds=[seed], unconditional=uncond)[0].ids
    return ids if ids[-1:] == [V.eot] else ids + [V.eot]


@pytest.mark.parametrize("decode", ["eager", "static"])
@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
def test_turns_equal_generation_from_scratch_and_read_each_token_once(model64, decode, sampling):
    kw = {} if sampling == "greedy" else {"text": SamplingConfig(temperature=1.0, top_p=0.9),
                                          "image": SamplingConfig(temperature=1.0, top_p=0.9)}
    config = chat_config(**kw)
    conv = Conversation(Engine(model64, vocab=V, decode=decode, key_block=32), config=config)
    for k, content in enumerate(USER_TURNS):
        history = list(conv.history)
        answer = conv.say(content)
        turn = conv.user_turn(content)
        assert answer.ids == from_scratch(model64, history, turn, config=config, seed=config.seed + k)
        assert answer.images, "min_images=1: every answer draws (so guidance is exercised)"
    # the cache holds every history token but the last chosen one (and a closing <eot> added after
    # a length stop), which the next turn feeds first
    assert conv.cache.length == conv.fed == conv.forward_positions
    assert len(conv.history) - conv.fed in (1, 2)


def test_each_turn_runs_only_its_new_tokens(model64):
    config = chat_config()
    conv = Conversation(Engine(model64, vocab=V), config=config)
    counter = PositionCounter(model64)
    try:
        for content in USER_TURNS:
            before, pending = len(counter.calls), len(conv.history) - conv.fed
            answer = conv.say(content)
            (rows, prefill), *steps = counter.calls[before:]
            # the prefill holds the new turn and what the cache had not seen yet (the previous
            # answer's last token, a closing <eot>): never the history; then one position per step
            assert rows == 2  # the conditional and the unconditional row (guidance)
            assert 1 <= pending <= 2 and prefill == pending + len(conv.user_turn(content))
            assert steps == [(2, 1)] * (len(answer.ids) - 1 - (answer.finish_reason == "length"))
    finally:
        counter.close()
    assert sum(t for _, t in counter.calls) == conv.cache.length  # every position once


def test_the_unconditional_row_is_the_history_with_the_current_turn_masked(model64):
    """Negative control: masking every text run of the history (the single-prompt default) gives
    other images, so the equality above pins the unconditional row's definition."""
    config = chat_config()
    conv = Conversation(Engine(model64, vocab=V), config=config)
    differ = False
    for k, content in enumerate(USER_TURNS):
        history = list(conv.history)
        answer = conv.say(content)
        turn = conv.user_turn(content)
        whole = from_scratch(model64, history, turn, config=config, seed=config.seed + k, masked=False)
        differ |= whole != answer.ids
    assert differ
    unguided = Conversation(Engine(model64, vocab=V), config=chat_config(guidance=False))
    assert unguided.rows == 1 and [unguided.say(c).ids for c in USER_TURNS] != []


def test_events_stream_the_answer(model64):
    conv = Conversation(Engine(model64, vocab=V), config=chat_config(max_new_tokens=20, min_images=2))
    events = []
    answer = conv.say(USER_TURNS[0], on_event=events.append)
    assert isinstance(events[-1], TurnDone) and events[-1].answer is answer
    text_ids = [e.id for e in events if isinstance(e, TextDelta)]
    assert text_ids == [i for s in answer.segments if hasattr(s, "ids") for i in s.ids]
    grids = [e.codes for e in events if isinstance(e, ImageDone)]
    assert grids == [s.codes for s in answer.images] and len(grids) == 2
    assert sum(isinstance(e, ImageStarted) for e in events) == 2


@pytest.mark.parametrize("decode", ["eager", "static"])
@pytest.mark.parametrize("stop_in", ["text", "image"])
def test_a_stopped_turn_is_closed_and_the_next_turn_still_equals_from_scratch(model64, decode, stop_in):
    config = chat_config(max_new_tokens=20, min_images=1)
    conv = Conversation(Engine(model64, vocab=V, decode=decode, key_block=32), config=config)
    events, asked = [], []

    def should_stop() -> bool:  # asked after each step (eager) or stretch of steps (static)
        asked.append(len(events))
        if stop_in == "text":
            return any(isinstance(e, TextDelta) for e in events)
        started = [i for i, e in enumerate(events) if isinstance(e, ImageStarted)]
        return bool(started) and sum(n > started[0] for n in asked) + (decode == "static") >= 2

    answer = conv.say([T0 + 2, T0 + 4], on_event=events.append, should_stop=should_stop)
    assert answer.finish_reason == "stopped"
    assert answer.ids[-1] == V.eot and all(s.complete for s in answer.images)  # no half image kept
    assert sum(t == V.break_id for t in answer.ids) % 2 == 0
    if stop_in == "image":  # an image had started and was dropped, its fed codes forgotten
        assert sum(isinstance(e, ImageStarted) for e in events) > sum(isinstance(e, ImageDone) for e in events)
    history = list(conv.history)
    nxt = conv.say(USER_TURNS[1])
    assert nxt.ids == from_scratch(model64, history, conv.user_turn(USER_TURNS[1]), config=config,
                                   seed=config.seed + 1)
    assert conv.cache.length == conv.fed and len(conv.history) - conv.fed in (1, 2)


def test_old_exchanges_are_dropped_when_the_context_fills(model64):
    config = chat_config(max_new_tokens=14, text=SamplingConfig(temperature=1.0, top_p=0.9))  # seeds matter
    conv = Conversation(Engine(model64, vocab=V), config=config, answer_room=14)
    for k in range(6):  # ~23 tokens per exchange in a 96-position context
        content = USER_TURNS[k % 3]
        history_before = list(conv.history)
        answer = conv.say(content)
        turn = conv.user_turn(content)
        kept_history = conv.history[:len(conv.history) - len(turn) - len(answer.ids)]
        assert kept_history[0] == V.eos and len(kept_history) + len(turn) + 14 <= 96
        assert answer.ids == from_scratch(model64, kept_history, turn, config=config, seed=config.seed + k)
        if kept_history != history_before:  # whole exchanges were dropped, oldest first
            assert history_before[-(len(kept_history) - 1):] == kept_history[1:]
            assert kept_history[1] == V.user_id
    assert conv.turns[0].start == 1 and len(conv.history) <= 96
    with pytest.raises(ValueError, match="the message takes"):
        conv.say([T0 + 1] * 90)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (the eager and static modes are tested above)")
@pytest.mark.parametrize("name", ["decoder", "cross"])
def test_cuda_graph_mode_turns_equal_eager(name):
    """On a GPU the chat's decode steps replay CUDA graphs (``Engine(decode="graph")``), turn after
    turn on the same cache, and every answer is the eager one (float64: the two step shapes agree)."""
    torch.manual_seed(3)
    m = float64(build_model(tiny_config(name, vocab=V)).eval().cuda())
    config = chat_config()
    answers = {}
    for decode in ("eager", "graph"):
        engine = Engine(m, vocab=V, decode=decode, key_block=16)
        conv = Conversation(engine, config=config)
        answers[decode] = [conv.say(content).ids for content in USER_TURNS]
    assert engine.decode_mode == "graph" and engine.static.graph_replays > 0
    assert answers["graph"] == answers["eager"]

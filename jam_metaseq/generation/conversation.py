"""A conversation with a JAM model that keeps its KV cache from turn to turn (paper §3.1 Decoding,
Eq. 6; issue 25; the format in docs/CONVERSATIONS.md).

The history is one token sequence, laid out as the training data lays out a conversation
(``jam_metaseq.data.documents``)::

    <eos>  <user> ... <eot> <assistant> ... <eot>  <user> ... <eot> <assistant> ...

Each ``say`` appends the new user turn and the ``<assistant>`` that opens the answer to the cache
the previous turns left, then decodes the answer with the engine's decode step (``Engine``: eager,
static or CUDA-graph mode, the same ``step.decode_step``) until the model writes ``<eot>``
(``GenerationConfig.end_id``). Only the tokens the cache has not seen are run: the new turn and the
last token of the previous answer (decoding chooses a token before it feeds it). The tokens are
those of a from-scratch ``Engine.generate`` on the whole history (``tests/test_generation_conversation.py``).

Classifier-free guidance inside a conversation (Eq. 6). The unconditional row of the turn is the
conversation **with the current user turn's text masked**: the same history (earlier turns, their
images and answers, unmasked), then ``<user>`` with each run of the new turn's text replaced by
one ``<mask>`` (images in the turn stay), ``<eot> <assistant>``. Guidance then amplifies what the
new request adds to the conversation ("now make it blue"), not the whole history. The cache holds
it as a second row: before each turn the conditional row's keys, values, padding and position
counters are copied into it (the rows share the history; the copy costs one pass over the cache
memory instead of a prefill), then each row gets its own version of the new turn, the shorter one
left-padded (padding is masked and takes no position), and both are fed every sampled token.

Long conversations: when the history, the new turn and ``answer_room`` tokens do not fit the
model's context, the oldest whole exchanges are dropped by the data's rule
(``data.instruct.fit_turns``; the new user turn is never dropped) and the cache is rebuilt once.

A stopped turn (``should_stop``) keeps what was written, minus an image still being drawn, and is
closed with ``<eot>`` like any other turn; a turn that raises (an error in ``on_event``, Ctrl-C)
leaves the conversation as it was before the turn. Events stream to ``on_event`` as tokens are chosen:
``TextDelta`` per text token, ``ImageStarted`` / ``ImageDone`` (the code grid, ready to decode) and
``TurnDone``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

from jam_metaseq.data.documents import frame_turn
from jam_metaseq.data.instruct import fit_turns

from .answer import Answer, split_segments
from .cfg import unconditional_prompt
from .config import GenerationConfig
from .engine import Engine
from .state import MixedModalState


@dataclass
class TextDelta:
    """One text token of the answer."""

    id: int
    """Text-tokenizer id (vocabulary id - text_start)."""


@dataclass
class ImageStarted:
    """The model opened an image (``<break>``); its codes follow."""


@dataclass
class ImageDone:
    """An image closed: its code grid, ready for the image decoder."""

    codes: list[list[int]]
    """(h, w) VQ codes."""


@dataclass
class TurnDone:
    """The answer ended."""

    answer: Answer
    """The whole answer (``finish_reason``: ``eot``, ``length`` or ``stopped``)."""


Event = Union[TextDelta, ImageStarted, ImageDone, TurnDone]


@dataclass
class Turn:
    """One turn of the history: ``history[start:end]`` is ``<role> ... <eot>``."""

    role: str
    start: int
    end: int


def turn_prompt(content: Sequence[int], *, vocab) -> list[int]:
    """``<user> content <eot> <assistant>``: what a user turn feeds, up to where the answer starts
    (content: vocabulary ids, text and ``<break>``-framed images). A conversation's first turn
    follows the ``<eos>`` that opens its history."""
    content = [int(t) for t in content]
    v = vocab
    bad = [t for t in content if not (v.is_text(t) or v.is_image(t) or t == v.break_id)]
    if bad:
        raise ValueError(f"a user turn holds text, image codes and <break> only; got id {bad[0]}")
    if sum(t == v.break_id for t in content) % 2:
        raise ValueError("a user turn holds whole images only (an odd number of <break>)")
    return frame_turn("user", content, vocab=v).tolist() + [v.assistant_id]


class Conversation:
    """A chat with one model whose KV cache grows turn by turn (module docstring)."""

    def __init__(self, engine: Engine, *, config: GenerationConfig, answer_room: int | None = None) -> None:
        """``engine``: this conversation's own (it holds the cache; engines over one model are
        cheap, so a server makes one per conversation). ``config``: sampling, guidance and limits
        of every answer (its ``end_id`` becomes ``<eot>``); the k-th answer (from 0, since the last
        ``reset``) samples with seed ``config.seed + k`` unless ``say`` is given one.
        ``answer_room``: positions kept free for an answer when old exchanges must be dropped
        (default ``min(max_new_tokens, context / 2)``)."""
        if not engine.use_cache:
            raise ValueError("a Conversation keeps a KV cache: the engine needs use_cache=True")
        vocab = engine.vocab
        self.engine = engine
        self.vocab = vocab
        self.config = dataclasses.replace(config, end_id=vocab.eot, check_done_every=1)
        self.answer_room = min(config.max_new_tokens, engine.max_positions // 2) if answer_room is None \
            else int(answer_room)
        self.rows = 2 if config.guidance else 1
        self.forward_positions = 0
        """Token positions run through the model so far (prefills and decode steps, first row)."""
        self.reset()

    # ---- state -----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation (the next turn starts a new one)."""
        self.history: list[int] = [self.vocab.eos]
        """Every token so far: the document separator, then each turn ``<role> ... <eot>``."""
        self.turns: list[Turn] = []
        self.answers = 0
        """Answers generated since the reset (the default seed of the next is ``config.seed + answers``)."""
        self.fed = 0
        """How many tokens of ``history`` the cache holds (the first row's; never padded)."""
        self.seen = torch.zeros(1, self.engine.vocab_size, dtype=torch.bool, device=self.engine.device)
        self.cache = None

    @property
    def turn_count(self) -> int:
        return len(self.turns)

    def allocate(self) -> None:
        """Allocate the KV cache now (otherwise the first turn does); it holds the model's whole
        context for ``rows`` rows."""
        self.cache = self.engine.setup_caches(batch_size=self.rows, max_len=self.engine.max_positions)
        self.fed = 0

    def _fit(self, new_turn: int) -> None:
        """Drop the oldest exchanges when the history, a new turn of ``new_turn`` tokens and the
        answer room overflow the context; then the cache is rebuilt."""
        budget = self.engine.max_positions - self.answer_room - 1  # the leading <eos>
        lengths = [t.end - t.start for t in self.turns] + [new_turn]
        first = fit_turns(lengths, budget=budget)
        if sum(lengths[first:]) > budget:
            raise ValueError(f"the message takes {new_turn} tokens; the model's context of "
                             f"{self.engine.max_positions} leaves {budget} for it (keeping {self.answer_room} "
                             "for the answer)")
        if first == 0:
            return
        cut = self.turns[first].start
        self.history = [self.vocab.eos] + self.history[cut:]
        self.turns = [Turn(t.role, t.start - cut + 1, t.end - cut + 1) for t in self.turns[first:]]
        self.cache = None  # positions changed: prefill the kept history again
        self.seen.zero_()  # and count only its tokens as seen (repetition penalty)

    def extend(self, turns: Sequence[tuple[str, Sequence[int]]]) -> None:
        """Append given turns ``(role, content ids)`` without generating them (a conversation read
        back, a teacher-forced history for evaluation); they go through the model with the next
        turn. They continue the alternation and end with an assistant turn."""
        framed = []
        for i, (role, content) in enumerate(turns):
            want = ("user", "assistant")[(len(self.turns) + i) % 2]
            if role != want:
                raise ValueError(f"given turn {i} is a {role} turn; the conversation expects a {want} turn")
            framed.append(frame_turn(role, [int(t) for t in content], vocab=self.vocab).tolist())
        if (len(self.turns) + len(framed)) % 2:
            raise ValueError("the given turns must end with an assistant turn (say() adds the next user turn)")
        for (role, _), ids in zip(turns, framed):
            self.turns.append(Turn(role, len(self.history), len(self.history) + len(ids)))
            self.history += ids

    # ---- one turn --------------------------------------------------------------------------------
    def user_turn(self, content: Sequence[int]) -> list[int]:
        """``<user> content <eot> <assistant>``: what a turn feeds (``turn_prompt``)."""
        return turn_prompt(content, vocab=self.vocab)

    def say(
        self, content: Sequence[int], *, seed: int | None = None, on_event: Callable[[Event], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Answer:
        """Add a user turn (``content``: text ids and framed images) and generate the answer."""
        engine, v, config = self.engine, self.vocab, self.config
        turn = self.user_turn(content)
        self._fit(len(turn))
        if self.cache is None:
            self.allocate()
        elif engine.cache is not self.cache:
            raise RuntimeError("the engine ran something else since this conversation's last turn: "
                               "give each Conversation an Engine of its own (the engine holds the cache)")
        seed = config.seed + self.answers if seed is None else int(seed)
        chunk = self.history[self.fed:] + turn  # the first row's new tokens
        rows = [chunk]
        if self.rows == 2:
            _copy_row(self.cache, src=0, dst=1)
            rows.append(self.history[self.fed:] + turn[:1] + unconditional_prompt(turn[1:], vocab=v))
        device = engine.device
        T = len(chunk)
        tokens = torch.full((self.rows, T), v.pad, dtype=torch.int64)
        for i, r in enumerate(rows):
            tokens[i, T - len(r):] = torch.tensor(r)  # the shorter (unconditional) row left-padded
        start = len(self.history) + len(turn)
        limit = min(config.max_new_tokens, engine.max_positions - start)
        if limit < 1:
            raise ValueError("no room left in the model's context for an answer")
        # the state scans the turn for an open image (a pending closing <break> would fool it)
        state = MixedModalState(engine.rules(config), [turn], limits=[limit], device=device)
        seen_before = self.seen.clone()
        self.seen[0, torch.tensor(chunk, device=device)] = True
        stream = _EventStream(v, on_event)
        try:
            with torch.inference_mode():
                columns = engine.logit_columns(state)
                logits = engine.prefill(tokens.to(device), columns=columns)
                out = engine.decode_n_tokens(
                    logits, state=state, seeds=torch.tensor([seed], device=device), seen=self.seen, config=config,
                    num_steps=limit, on_step=stream.step, columns_of_first=columns, should_stop=should_stop)
        except BaseException:  # a failed or interrupted turn leaves the conversation as it was before it
            if self.cache.length > self.fed:
                _rewind(self.cache, self.cache.length - self.fed)
            self.seen.copy_(seen_before)
            raise
        n = int(state.generated[0])  # >= 1: the prefill logits always choose a token
        ids = out[0, :n].tolist()
        self.forward_positions += T + n - 1
        finish = "eot" if bool(state.hit_eos[0]) else ("length" if bool(state.done[0]) else "stopped")
        kept = ids if not stream.open_image else ids[:stream.open_at]  # an unfinished image is dropped
        if not kept or kept[-1] != v.eot:
            kept = kept + [v.eot]  # every turn of the history is closed
        base = len(self.history) + len(turn)  # the cache holds history + turn + ids[:n - 1]
        common = 0
        for a, b in zip(ids[:n - 1], kept):
            if a != b:
                break
            common += 1
        if self.cache.length > base + common:  # the dropped image had been fed: forget it
            _rewind(self.cache, self.cache.length - base - common)
        self.fed = base + common
        self.turns += [Turn("user", len(self.history), base - 1),
                       Turn("assistant", base - 1, base + len(kept))]
        self.history += turn + kept
        self.answers += 1
        answer = Answer(prompt_ids=turn, ids=kept, finish_reason=finish, seed=seed,
                        segments=split_segments(kept, vocab=v))
        stream.emit(TurnDone(answer))
        return answer


class _EventStream:
    """Turns the decode loop's per-step tokens into ``Event``s for one answer (batch row 0)."""

    def __init__(self, vocab, on_event: Callable[[Event], None] | None) -> None:
        self.vocab = vocab
        self.on_event = on_event
        self.count = 0
        self.open_image = False
        self.open_at = 0
        self.codes: list[int] = []

    def emit(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def step(self, tokens: torch.Tensor, _image_rows: torch.Tensor) -> None:
        t = int(tokens[0])
        v = self.vocab
        i = self.count
        self.count += 1
        if self.open_image:
            if t == v.break_id:
                self.open_image = False
                h, w = v.image_grid
                self.emit(ImageDone([self.codes[r * w:(r + 1) * w] for r in range(h)]))
            elif v.is_image(t):
                self.codes.append(int(v.image_code(t)))
        elif t == v.break_id:
            self.open_image, self.open_at, self.codes = True, i, []
            self.emit(ImageStarted())
        elif v.is_text(t):
            self.emit(TextDelta(t - v.text_start))


def _copy_row(cache, *, src: int, dst: int) -> None:
    """Row ``dst`` of the cache becomes row ``src`` (keys, values, padding of the positions written so
    far, position counter); positions after ``length`` are rewritten before they are attended."""
    n = cache.length
    for buf in cache.buffers():  # (S, B, H, L, D)
        buf[:, dst, :, :n].copy_(buf[:, src, :, :n])
    cache.key_padding[dst, :n].copy_(cache.key_padding[src, :n])
    cache.positions[dst].copy_(cache.positions[src])


def _rewind(cache, n: int) -> None:
    """Forget the last ``n`` cached positions, which were unpadded in every row (generated tokens
    are fed to every row): later writes overwrite them."""
    cache.length -= n
    cache.offset -= n
    cache.positions -= n


__all__ = ["Conversation", "Event", "ImageDone", "ImageStarted", "TextDelta", "Turn", "TurnDone", "turn_prompt"]

"""The decode step, written once for every decode mode (paper §3.1 "Decoding Strategies").

``decode_step`` is gpt-fast's ``decode_one_token`` for mixed-modal CFG decoding: the fed tokens'
next logits through the KV cache (``next_logits``), then ``choose_tokens`` (guidance of Eq. 6 on
image rows, repetition penalty on text rows, the state machine's constraints, per-(seed, step)
sampling), then record the token and whether it was an image token, ``MixedModalState.advance``,
mark it seen and feed it to both rows of its CFG pair. Everything it reads and writes lives in
``DecodeBuffers`` and is updated in place, with the step counter a device tensor, so

- the eager loop (``Engine.decode_n_tokens``) calls it with keys that grow each step,
- the static loop (``static.StaticDecoder``) calls it over a fixed key span, and
- the graph mode captures that same call as a CUDA graph and replays it.

With guidance the logits hold 2B rows: rows [0, B) are the prompts, rows [B, 2B) their
unconditional twins; both are fed the same sampled token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from .cfg import blend
from .sampling import apply_repetition_penalty, sample
from .state import MixedModalState

if TYPE_CHECKING:
    from jam_metaseq.models import KVCache

    from .config import GenerationConfig

Forward = Callable[[torch.Tensor, "tuple[int, int] | None"], torch.Tensor]
"""``forward(tokens (R, T), columns) -> (R, V or hi - lo)`` logits of the last position."""


def next_logits(model: nn.Module, tokens: torch.Tensor, columns: tuple[int, int] | None = None, *,
                cache: "KVCache | None" = None, span: int | None = None) -> torch.Tensor:
    """(R, T) tokens through ``cache`` -> (R, V) logits of the last position, or only the
    ``columns`` [lo, hi) of the tied output projection (image steps need 8192 of ~65k rows);
    ``span``: a static step attending to that many cached keys."""
    if span is None:
        feats = model.extract_features(tokens, cache=cache)[:, -1]  # (R, E): last position only
    else:
        feats = model.extract_features(tokens, cache=cache, span=span)[:, -1]
    if columns is None:
        return model.output_layer(feats)  # (R, V)
    weight = model.decoder.output_projection.weight[columns[0] : columns[1]]
    return torch.nn.functional.linear(feats, weight)  # (R, hi - lo)


def choose_tokens(
    logits: torch.Tensor, *, state: MixedModalState, seeds: torch.Tensor, step: torch.Tensor | int,
    seen: torch.Tensor, config: "GenerationConfig", columns: tuple[int, int] | None = None,
) -> torch.Tensor:
    """(R, V) logits of all rows (or their ``columns`` [lo, hi)) -> (B,) next token per prompt."""
    B = state.mode.shape[0]
    lo, hi = columns if columns is not None else (0, state.rules.vocab_size)
    cond = logits[:B].float()  # (B, V)
    image_rows = state.image_rows()  # (B,)
    scores = cond
    if config.guidance and logits.shape[0] == 2 * B:
        guided = blend(cond, logits[B:].float(), alpha=config.guidance_scale)
        scores = torch.where(image_rows[:, None], guided, cond)
    if config.text.repetition_penalty != 1.0:
        penalised = apply_repetition_penalty(scores, seen=seen[:, lo:hi], penalty=config.text.repetition_penalty)
        scores = torch.where(image_rows[:, None], scores, penalised)
    allowed = state.allowed()[:, lo:hi]
    # Forced rows may have nothing allowed inside ``columns``: give them finite scores (unused).
    scores = torch.where(
        allowed.any(dim=-1, keepdim=True), scores.masked_fill(~allowed, float("-inf")), torch.zeros_like(scores)
    )
    txt, img = config.text, config.image

    def per_row(text_value, image_value, dtype):
        # Filled on the device (torch.tensor(value, device=...) would be a synchronous copy).
        return torch.full(image_rows.shape, text_value, dtype=dtype, device=scores.device).masked_fill_(
            image_rows, image_value
        )

    filtering = txt.top_k > 0 or img.top_k > 0 or txt.top_p < 1 or img.top_p < 1
    tokens = sample(
        scores, seeds=seeds, step=step,
        temperature=per_row(txt.temperature, img.temperature, torch.float32),
        top_k=per_row(txt.top_k, img.top_k, torch.int64) if filtering else None,
        top_p=per_row(txt.top_p, img.top_p, torch.float32) if filtering else None,
    )
    forced = state.forced()
    return torch.where(forced >= 0, forced, tokens + lo)


@dataclass
class DecodeBuffers:
    """Everything a decode step reads and writes, updated in place (a CUDA graph replays on these
    addresses): B prompts, R = B or 2B rows fed, room for ``out.shape[1]`` tokens."""

    state: MixedModalState
    """The per-row mixed-modal state (advanced in place)."""
    seeds: torch.Tensor
    """(B,) int64: each row's sampling seed."""
    seen: torch.Tensor
    """(B, V) bool: tokens in the prompt or generated so far (repetition penalty)."""
    feed: torch.Tensor
    """(R, 1) int64: the tokens the next forward consumes (each chosen token, to both CFG rows)."""
    out: torch.Tensor
    """(B, steps) int64: chosen tokens, ``<pad>`` where none was chosen yet."""
    image_rows: torch.Tensor
    """(B, steps) bool: whether a row's token at that step was an image code (progress counts)."""
    step: torch.Tensor
    """() int64: the next step's index (the sampler's counter)."""

    @classmethod
    def wrap(cls, state: MixedModalState, *, seeds: torch.Tensor, seen: torch.Tensor, rows: int, steps: int,
             pad: int) -> "DecodeBuffers":
        """Buffers around the caller's ``state``, ``seeds`` and ``seen`` (updated where they are)."""
        B, device = seeds.shape[0], seeds.device
        return cls(state=state, seeds=seeds, seen=seen,
                   feed=torch.zeros((rows, 1), dtype=torch.int64, device=device),
                   out=torch.full((B, steps), pad, dtype=torch.int64, device=device),
                   image_rows=torch.zeros((B, steps), dtype=torch.bool, device=device),
                   step=torch.zeros((), dtype=torch.int64, device=device))

    def signature(self) -> tuple:
        """Shapes, dtypes and devices of every buffer (whether another call can reuse them)."""
        return tuple((tuple(t.shape), t.dtype, t.device) for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [*self.state.tensors(), self.seeds, self.seen, self.feed, self.out, self.image_rows, self.step]

    def load_(self, state: MixedModalState, *, seeds: torch.Tensor, seen: torch.Tensor, pad: int) -> None:
        """Start a call in these (persistent) buffers: copy its state, seeds and seen tokens in."""
        self.state.copy_(state)
        self.seeds.copy_(seeds)
        self.seen.copy_(seen)
        self.out.fill_(pad)
        self.step.zero_()


def decode_step(bufs: DecodeBuffers, *, forward: Forward, columns: tuple[int, int] | None,
                config: "GenerationConfig", logits: torch.Tensor | None = None) -> None:
    """One token per prompt: ``forward(bufs.feed, columns)`` (or the given prefill ``logits``) ->
    choose -> record -> advance the state -> mark seen -> feed it -> next step. No host sync."""
    if logits is None:
        logits = forward(bufs.feed, columns)
    state = bufs.state
    B = bufs.seeds.shape[0]
    image_rows = state.image_rows()  # (B,) before the token
    tokens = choose_tokens(logits, state=state, seeds=bufs.seeds, step=bufs.step, seen=bufs.seen, config=config,
                           columns=columns)  # (B,)
    at = bufs.step.view(1)
    bufs.out.index_copy_(1, at, tokens[:, None])
    bufs.image_rows.index_copy_(1, at, image_rows[:, None])
    state.advance(tokens)
    bufs.seen.scatter_(1, tokens[:, None], True)
    bufs.feed.copy_(tokens.repeat(bufs.feed.shape[0] // B)[:, None])  # same token to the cond and uncond row
    bufs.step += 1

"""Static-shape decode steps for the generation engine, optionally replayed as CUDA graphs (§3.1).

The eager loop (``Engine.decode_n_tokens``) attends to a key range that grows every step and asks
the device, every step, whether the next logits may be cut to the image codes and whether every row
finished; on an accelerator its step time is launch overhead and host syncs. Here (``Engine(...,
decode="static" | "graph")``):

- every step attends to a fixed span of the cache, a multiple of ``key_block`` keys
  (``decoder.build_static_context``): positions, masks and the K/V write offset live on the device;
- the whole step -- ``step.decode_step``, the eager loop's step: forward, CFG of Eq. 6,
  constraints, seeded sampling, ``MixedModalState.advance`` and the bookkeeping -- reads and writes
  persistent ``DecodeBuffers``, so ``graph`` captures it (``torch.cuda.graph``, after a warm-up on
  a side stream) once per (key span, logit columns, sampling settings) and replays it;
- the host reads the state only where ``plan`` says: inside an image every row stays an image row
  for ``image_tokens - image_pos`` more steps, so those steps run without a single sync.

Same seeds give the same tokens as the eager loop: a step is the same function with the same
logit columns; only the attention sees extra keys, masked out (logits equal up to float rounding).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from jam_metaseq.models import KVCache

from .state import DONE, IMAGE, MixedModalState
from .step import DecodeBuffers, decode_step, next_logits

if TYPE_CHECKING:
    from .config import GenerationConfig

GRAPH_WARMUP_STEPS = 2
"""Eager runs of a step on a side stream before its capture (lazy library init, allocator)."""


def round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def plan(
    *, mode: list[int], image_pos: list[int], left: list[int], forced: list[bool], image_tokens: int,
    image_columns: tuple[int, int] | None, check_done_every: int,
) -> tuple[tuple[int, int] | None, int] | None:
    """From the per-row state read once: (logit columns, steps they stay right), None if all rows are done.

    The columns are those ``Engine.logit_columns`` would give (``image_columns`` when every row's
    next token is an image code or forced). While that holds, an IMAGE row stays one for
    ``image_tokens - image_pos`` steps (and live for ``left``), a DONE row stays DONE, any other
    forced row (a closing or owed ``<break>``) changes after one step. With text rows the next
    sampled token decides, so one step; without column slicing only the done check matters.
    """
    if all(m == DONE for m in mode):
        return None
    if all(m == IMAGE or f for m, f in zip(mode, forced)):
        steps = min(
            min(image_tokens - p, n) if m == IMAGE else 1
            for m, p, n in zip(mode, image_pos, left) if m != DONE
        )
        return image_columns, max(steps, 1)
    if image_columns is not None:
        return None, 1
    return None, check_done_every


class StaticDecoder:
    """Fixed-shape decode steps over persistent ``DecodeBuffers`` (and their CUDA graphs) for one model."""

    def __init__(self, model: nn.Module, *, pad: int, use_graphs: bool, key_block: int) -> None:
        self.model = model
        self.pad = pad
        self.key_block = key_block
        self.use_graphs = use_graphs
        device = next(model.parameters()).device
        if use_graphs and device.type != "cuda":
            warnings.warn(
                f"decode='graph' needs a CUDA device (the model is on {device}); "
                "decoding with static shapes, without graphs", RuntimeWarning, stacklevel=3,
            )
            self.use_graphs = False
        self.cache: KVCache | None = None
        self.bufs: DecodeBuffers | None = None
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.graph_replays = 0

    # ---- buffers -------------------------------------------------------------------------------
    def setup_cache(self, *, batch_size: int, max_len: int) -> KVCache:
        """A cache of at least ``max_len`` positions (rounded up to ``key_block``); the previous one is
        reset and kept when it fits, so the captured graphs (which hold its addresses) stay valid."""
        c = self.cache
        p = next(self.model.parameters())
        if c is not None and c.batch_size == batch_size and c.max_len >= max_len and c.k.device == p.device \
                and c.k.dtype == p.dtype:
            c.reset()
            return c
        self.drop()
        cap = round_up(max_len, self.key_block) if self.key_block else max_len
        self.cache = self.model.setup_caches(batch_size, cap)
        return self.cache

    def drop(self) -> None:
        """Forget the cache, buffers and graphs."""
        self.graphs.clear()
        self.bufs = None
        self.cache = None

    def span(self, new_tokens: int = 1) -> int:
        """Keys attended by a step appending ``new_tokens`` after the current length."""
        c = self.cache
        if not self.key_block:
            return c.max_len
        return min(c.max_len, round_up(c.length + new_tokens, self.key_block))

    def logits(self, tokens: torch.Tensor, columns: tuple[int, int] | None) -> torch.Tensor:
        """One static forward: (R, T) tokens -> (R, V) (or ``columns``) logits of the last position."""
        return next_logits(self.model, tokens, columns, cache=self.cache, span=self.span(tokens.shape[1]))

    def _bind(self, state: MixedModalState, *, seeds: torch.Tensor, seen: torch.Tensor, rows: int) -> DecodeBuffers:
        """The persistent buffers, holding a copy of the call's state (new buffers, and no graphs, when
        the shapes changed)."""
        fresh = DecodeBuffers.wrap(state, seeds=seeds, seen=seen, rows=rows, steps=self.cache.max_len, pad=self.pad)
        if self.bufs is None or self.bufs.signature() != fresh.signature():
            self.graphs.clear()  # they read and write the old buffers
            self.bufs = DecodeBuffers.wrap(state.clone(), seeds=seeds.clone(), seen=seen.clone(), rows=rows,
                                           steps=self.cache.max_len, pad=self.pad)
        self.bufs.load_(state, seeds=seeds, seen=seen, pad=self.pad)
        return self.bufs

    # ---- one step ------------------------------------------------------------------------------
    def _body(self, *, columns, span: int, config: "GenerationConfig") -> None:
        """``decode_step`` over ``span`` keys: the step a graph captures."""
        decode_step(self.bufs, forward=functools.partial(next_logits, self.model, cache=self.cache, span=span),
                    columns=columns, config=config)

    def _step(self, *, columns, config: "GenerationConfig", settings: tuple) -> None:
        span = self.span()
        if self.use_graphs:
            key = (columns, span, settings)
            graph = self.graphs.get(key)
            if graph is None:
                graph = self._capture(key, columns=columns, span=span, config=config)
            if graph is not None:
                graph.replay()
                self.cache.length += 1  # what the captured forward's ``cache.advance`` did on the host
                self.graph_replays += 1
                return
        self._body(columns=columns, span=span, config=config)

    # ---- CUDA graphs ---------------------------------------------------------------------------
    def _mutable(self) -> list[torch.Tensor]:
        """Everything a step writes except the K/V at the write offset (rewritten by the real step)."""
        c = self.cache
        return self.bufs.tensors() + [c.positions, c.offset, c.key_padding]

    def _capture(self, key: tuple, *, columns, span: int, config) -> torch.cuda.CUDAGraph | None:
        """Warm the step up on a side stream, capture it, and undo the warm-up's writes; on failure
        warn, fall back to static steps for good and return None."""
        saved = [(t, t.clone()) for t in self._mutable()]
        length = self.cache.length

        def restore() -> None:
            for t, copy in saved:
                t.copy_(copy)
            self.cache.length = length

        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP_STEPS):
                    self._body(columns=columns, span=span, config=config)
                    restore()
            torch.cuda.current_stream().wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._body(columns=columns, span=span, config=config)
            self.cache.length = length  # capture records kernels without running them
        except Exception as e:  # noqa: BLE001 -- any capture failure: decode without graphs
            warnings.warn(
                f"CUDA graph capture of the decode step failed ({type(e).__name__}: {e}); "
                "decoding with static shapes, without graphs", RuntimeWarning, stacklevel=2,
            )
            self.use_graphs = False
            self.graphs.clear()
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                pass
            restore()
            return None
        self.graphs[key] = graph
        return graph

    # ---- the loop ------------------------------------------------------------------------------
    def decode(
        self, logits: torch.Tensor, *, state: MixedModalState, seeds: torch.Tensor, seen: torch.Tensor,
        config: "GenerationConfig", num_steps: int, image_columns: tuple[int, int] | None,
        on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
        columns_of_first: tuple[int, int] | None = None, should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """``Engine.decode_n_tokens`` with static steps: (B, num_steps) tokens from the prefill logits;
        ``image_columns``: the columns of image-only steps (``Engine.image_columns``). ``state`` and
        ``seen`` end as the eager loop leaves them. ``should_stop`` is asked once per stretch of
        steps, after they were reported."""
        if self.cache is None or num_steps > self.cache.max_len - self.cache.length + 1:
            raise ValueError("setup_caches and prefill before decoding, with room for every step")
        b = self._bind(state, seeds=seeds, seen=seen, rows=logits.shape[0])
        st = b.state
        rules = st.rules
        # What a captured step bakes in besides its shapes (the length budget is a state tensor).
        settings = (_settings_key(config), dataclasses.replace(rules, max_new_tokens=1))
        decode_step(b, forward=self.logits, columns=columns_of_first, config=config, logits=logits)  # token 0
        step = 1
        reported = 0
        while step < num_steps:
            forced = (st.forced() >= 0).long()
            mode, image_pos, left, forced = torch.stack(
                [st.mode, st.image_pos, st.limit - st.generated, forced]
            ).tolist()  # the one host sync of this stretch
            if on_step is not None:
                for s in range(reported, step):
                    on_step(b.out[:, s], b.image_rows[:, s])
                reported = step
            if should_stop is not None and should_stop():
                break
            planned = plan(
                mode=mode, image_pos=image_pos, left=left, forced=[bool(f) for f in forced],
                image_tokens=rules.image_tokens, image_columns=image_columns,
                check_done_every=config.check_done_every,
            )
            if planned is None:
                break
            columns, n = planned
            for _ in range(min(n, num_steps - step)):
                self._step(columns=columns, config=config, settings=settings)
                step += 1
        if on_step is not None:
            for s in range(reported, step):
                on_step(b.out[:, s], b.image_rows[:, s])
        out = b.out[:, :num_steps].clone()  # (B, num_steps)
        state.copy_(st)
        seen.copy_(b.seen)
        return out


def _settings_key(config: "GenerationConfig") -> tuple:
    """The parts of a ``GenerationConfig`` a captured step bakes in as constants."""
    return (dataclasses.astuple(config.text), dataclasses.astuple(config.image), config.guidance_scale,
            config.guidance)

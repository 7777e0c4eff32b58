"""Mixed-modal generation engine: prefill + KV cache, per-row modality state, CFG (paper §3.1).

Small named steps (gpt-fast style):

- ``setup_caches``: one explicit ``KVCache`` for all rows (JAM-Cross caches both branches and its
  cross blocks' keys/values; the model decides what it stores).
- ``prefill``: the left-padded prompts in one forward pass; returns the last position's logits.
- ``decode_one_token``: one (R, 1) forward through the cache.
- ``decode_n_tokens``: the loop of ``step.decode_step`` (forward, guidance of Eq. 6 on image rows,
  repetition penalty on text rows, the mixed-modal constraints of ``state.py``, per-row seeded
  sampling of ``sampling.py``, state advance); ``generate`` ties it together and returns
  structured ``Answer``s.

``decode="static"`` / ``"graph"`` run the same ``decode_step`` with fixed shapes over persistent
buffers, the latter as replayed CUDA graphs (``static.py``); the default ``"eager"`` is fastest on CPU.

With guidance the batch holds 2B rows: rows [0, B) are the prompts, rows [B, 2B) the same prompts
with their text replaced by ``<mask>`` (``cfg.unconditional_prompt``). Both rows of a pair run in
the same forward pass and are fed the same sampled token; only image tokens are guided, text is
sampled from the conditional row alone.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
from torch import nn

from jam_metaseq.vocab import VocabManifest

from .answer import Answer, open_image_codes, split_segments
from .cfg import unconditional_prompt
from .config import GenerationConfig
from .state import IMAGE, MixedModalRules, MixedModalState
from .static import StaticDecoder
from .step import DecodeBuffers, decode_step, next_logits

DECODE_MODES = ("eager", "static", "graph")


class Engine:
    """Generates interleaved answers from any model with the ``jam_metaseq.models`` interface."""

    def __init__(
        self, model: nn.Module, *, vocab: VocabManifest, use_cache: bool = True, slice_image_logits: bool = True,
        decode: str = "eager", key_block: int = 256,
    ) -> None:
        """``use_cache=False`` reruns the whole sequence each step (the reference for tests);
        ``slice_image_logits`` projects only the image-code rows on image-only steps.

        ``decode``: ``eager`` (the attended keys grow each step; fastest on CPU), ``static`` (fixed
        shapes, no host sync inside a step, the state read only where needed) or ``graph`` (static
        steps replayed as CUDA graphs; static, with a warning, off CUDA or if capture fails).
        ``key_block``: static steps attend to the cache in multiples of this many keys (one graph
        per multiple; 0 = always the whole cache)."""
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
        if decode != "eager" and not use_cache:
            raise ValueError(f"decode={decode!r} needs the KV cache (use_cache=True)")
        if key_block < 0:
            raise ValueError(f"key_block must be >= 0, got {key_block}")
        cfg = model.cfg
        vocab.check_embedding(cfg.vocab_size, what="model")
        if cfg.padding_idx != vocab.pad:
            raise ValueError(f"model padding_idx {cfg.padding_idx} != vocab manifest pad {vocab.pad}")
        self.model = model.eval()
        self.vocab = vocab
        self.use_cache = use_cache
        self.slice_image_logits = slice_image_logits
        self.vocab_size = cfg.vocab_size
        self.max_positions = cfg.max_positions
        self.pad = vocab.pad
        self.cache = None
        self._seq: torch.Tensor | None = None  # (R, T) whole sequences, uncached mode only
        self.static = None if decode == "eager" else StaticDecoder(
            model, pad=vocab.pad, use_graphs=decode == "graph", key_block=key_block
        )

    @property
    def decode_mode(self) -> str:
        """The decode mode in effect (``graph`` becomes ``static`` after a fallback)."""
        if self.static is None:
            return "eager"
        return "graph" if self.static.use_graphs else "static"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- model steps ---------------------------------------------------------------------------
    def setup_caches(self, *, batch_size: int, max_len: int):
        """Allocate the KV cache for ``batch_size`` rows of up to ``max_len`` positions."""
        self._seq = None
        if self.static is not None:
            self.cache = self.static.setup_cache(batch_size=batch_size, max_len=max_len)
        else:
            self.cache = self.model.setup_caches(batch_size, max_len) if self.use_cache else None
        return self.cache

    def prefill(self, tokens: torch.Tensor, *, columns: tuple[int, int] | None = None) -> torch.Tensor:
        """(R, T) left-padded prompts -> (R, V) next-token logits (or the ``columns`` [lo, hi) only)."""
        if not self.use_cache:
            self._seq = tokens
        return next_logits(self.model, tokens, columns, cache=self.cache)

    def decode_one_token(self, tokens: torch.Tensor, columns: tuple[int, int] | None = None) -> torch.Tensor:
        """(R, 1) tokens -> (R, V) next-token logits (uncached mode reruns the whole sequence; static
        modes run a fixed-shape step)."""
        if self.static is not None:
            return self.static.logits(tokens, columns)
        if self.use_cache:
            return next_logits(self.model, tokens, columns, cache=self.cache)
        assert self._seq is not None, "prefill first"
        self._seq = torch.cat([self._seq, tokens], dim=1)
        return next_logits(self.model, self._seq, columns)

    def image_columns(self) -> tuple[int, int] | None:
        """The image-code columns [lo, hi) image-only steps project, None when slicing is off."""
        if not self.slice_image_logits or not hasattr(self.model.decoder, "output_projection"):
            return None
        return (self.vocab.image_start, self.vocab.image_end)

    def logit_columns(self, state: MixedModalState) -> tuple[int, int] | None:
        """The image-code columns when every row's next token is an image code or forced, else None
        (all columns). One host sync; it saves most of the output projection on image steps."""
        columns = self.image_columns()
        if columns is not None and bool(((state.mode == IMAGE) | (state.forced() >= 0)).all()):
            return columns
        return None

    # ---- the loop ------------------------------------------------------------------------------
    def rules(self, config: GenerationConfig) -> MixedModalRules:
        """The state machine's ids and limits for ``config`` (its ``end_id`` ends an answer)."""
        rules = MixedModalRules.from_vocab(
            self.vocab, vocab_size=self.vocab_size, max_new_tokens=config.max_new_tokens,
            max_images=config.max_images, min_images=config.min_images,
            force_image_first=config.force_image_first,
        )
        return rules if config.end_id is None else dataclasses.replace(rules, eos=config.end_id)

    def decode_n_tokens(
        self, logits: torch.Tensor, *, state: MixedModalState, seeds: torch.Tensor, seen: torch.Tensor,
        config: GenerationConfig, num_steps: int,
        on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
        columns_of_first: tuple[int, int] | None = None, should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Up to ``num_steps`` tokens per prompt, starting from the prefill ``logits`` -> (B, steps);
        ``columns_of_first``: the columns those logits hold (``logit_columns``). ``should_stop``:
        asked after each reported step (a stop button); True ends the loop there, the tokens chosen
        so far counted in ``state.generated``."""
        if self.static is not None:
            return self.static.decode(
                logits, state=state, seeds=seeds, seen=seen, config=config, num_steps=num_steps,
                image_columns=self.image_columns(), on_step=on_step, columns_of_first=columns_of_first,
                should_stop=should_stop,
            )
        bufs = DecodeBuffers.wrap(state, seeds=seeds, seen=seen, rows=logits.shape[0], steps=num_steps, pad=self.pad)
        decode_step(bufs, forward=self.decode_one_token, columns=columns_of_first, config=config, logits=logits)
        for step in range(1, num_steps + 1):
            if on_step is not None:
                on_step(bufs.out[:, step - 1], bufs.image_rows[:, step - 1])
            if step == num_steps or (should_stop is not None and should_stop()):
                break
            if step % config.check_done_every == 0 and bool(state.done.all()):
                break
            decode_step(bufs, forward=self.decode_one_token, columns=self.logit_columns(state), config=config)
        return bufs.out

    def generate(
        self, prompts: Sequence[Sequence[int]], *, config: GenerationConfig,
        seeds: Sequence[int] | None = None, progress: bool = False,
        unconditional: Sequence[Sequence[int]] | None = None,
    ) -> list[Answer]:
        """One ``Answer`` per prompt (vocabulary ids, e.g. ``[bos] + text ids``).

        ``unconditional``: the CFG rows, one per prompt; default ``unconditional_prompt(prompt)``
        (every text run replaced by ``<mask>``). Retrieval passes rows that keep the retrieved prefix.
        """
        if not prompts:
            return []
        B = len(prompts)
        prompts = [[int(t) for t in p] for p in prompts]
        seeds = [config.seed + i for i in range(B)] if seeds is None else [int(s) for s in seeds]
        if len(seeds) != B:
            raise ValueError(f"{len(seeds)} seeds for {B} prompts")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < self.vocab_size or t == self.pad]
            if bad:
                raise ValueError(f"prompt {i} holds ids outside [0, {self.vocab_size}) or <pad>: {bad[:5]}")
            if len(p) >= self.max_positions:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; the model's context holds {self.max_positions} "
                    "and at least one must be left to generate"
                )
        limits = [min(config.max_new_tokens, self.max_positions - len(p)) for p in prompts]
        rules = self.rules(config)
        device = self.device
        rows = list(prompts)
        if config.guidance:
            if unconditional is None:
                unconditional = [unconditional_prompt(p, vocab=self.vocab) for p in prompts]
            if len(unconditional) != B:
                raise ValueError(f"{len(unconditional)} unconditional rows for {B} prompts")
            for i, (u, p) in enumerate(zip(unconditional, prompts)):
                if not 0 < len(u) <= len(p):
                    raise ValueError(f"unconditional row {i} has {len(u)} tokens; its prompt has {len(p)}")
            rows += [[int(t) for t in u] for u in unconditional]
        L = max(len(r) for r in rows)
        tokens = torch.full((len(rows), L), self.pad, dtype=torch.int64)
        for i, r in enumerate(rows):
            tokens[i, L - len(r):] = torch.tensor(r)  # left padding
        steps = max(limits)
        state = MixedModalState(rules, prompts, limits=limits, device=device)
        seen = torch.zeros(B, self.vocab_size, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, torch.tensor(p, device=device)] = True
        seed_t = torch.tensor(seeds, dtype=torch.int64, device=device)

        bar = None
        on_step = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(unit="img tok", desc="image tokens", dynamic_ncols=True)

            def on_step(_tokens: torch.Tensor, image_rows: torch.Tensor) -> None:
                n = int(image_rows.sum())
                if n:
                    bar.update(n)

        try:
            with torch.inference_mode():
                self.setup_caches(batch_size=len(rows), max_len=L + steps)
                columns = self.logit_columns(state)
                logits = self.prefill(tokens.to(device), columns=columns)
                out = self.decode_n_tokens(
                    logits, state=state, seeds=seed_t, seen=seen, config=config, num_steps=steps,
                    on_step=on_step, columns_of_first=columns,
                )
        finally:
            if bar is not None:
                bar.close()
        lengths = state.generated.tolist()
        hit_eos = state.hit_eos.tolist()
        out = out.cpu()
        answers = []
        for i, p in enumerate(prompts):
            ids = out[i, : lengths[i]].tolist()
            answers.append(Answer(
                prompt_ids=p, ids=ids, finish_reason="eos" if hit_eos[i] else "length", seed=seeds[i],
                segments=split_segments(ids, vocab=self.vocab, open_image=open_image_codes(p, vocab=self.vocab)),
            ))
        return answers

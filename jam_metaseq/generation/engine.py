"""Mixed-modal generation engine: prefill + KV cache, per-row modality state, CFG (paper §3.1).

Small named steps (gpt-fast style):

- ``setup_caches``: one explicit ``KVCache`` for all rows (JAM-Cross caches both branches and its
  cross blocks' keys/values; the model decides what it stores).
- ``prefill``: the left-padded prompts in one forward pass; returns the last position's logits.
- ``choose_tokens``: guidance (Eq. 6) on image rows, repetition penalty on text rows, the mixed-modal
  constraints (``state.py``), then per-row seeded sampling (``sampling.py``).
- ``decode_one_token``: one (R, 1) step through the cache.
- ``decode_n_tokens``: the loop; ``generate`` ties it together and returns structured ``Answer``s.

``decode="static"`` / ``"graph"`` run the decode steps with fixed shapes over persistent buffers,
the latter as replayed CUDA graphs (``static.py``); the default ``"eager"`` is fastest on CPU.

With guidance the batch holds 2B rows: rows [0, B) are the prompts, rows [B, 2B) the same prompts
with their text replaced by ``<mask>`` (``cfg.unconditional_prompt``). Both rows of a pair run in
the same forward pass and are fed the same sampled token; only image tokens are guided, text is
sampled from the conditional row alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from jam_metaseq.vocab import VocabManifest

from .answer import Answer, open_image_codes, split_segments
from .cfg import DEFAULT_ALPHA, blend, unconditional_prompt
from .sampling import SamplingConfig, apply_repetition_penalty, sample
from .state import IMAGE, MixedModalRules, MixedModalState
from .static import StaticDecoder

DECODE_MODES = ("eager", "static", "graph")


def _default_sampling() -> SamplingConfig:
    return SamplingConfig(temperature=1.0, top_p=0.9)


@dataclass
class GenerationConfig:
    """Everything that shapes one ``generate`` call."""

    max_new_tokens: int = 1280
    """Generated tokens per answer, images included (lowered per prompt to fit the context)."""
    text: SamplingConfig = field(default_factory=_default_sampling)
    """Sampling of text tokens (paper: tau = 1, top-p 0.8-1)."""
    image: SamplingConfig = field(default_factory=_default_sampling)
    """Sampling of image tokens (the repetition penalty is never applied to them)."""
    guidance_scale: float = DEFAULT_ALPHA
    """CFG alpha of Eq. 6 (paper: 3.5 or 4); 1 = plain conditional sampling."""
    guidance: bool = True
    """Run the unconditional rows at all (False halves the batch; image tokens then unguided)."""
    max_images: int = 3
    """Images per answer; 0 forbids images."""
    min_images: int = 0
    """``<eos>`` is forbidden until this many images were written (while one still fits)."""
    force_image_first: bool = False
    """Start the answer with an image (text-to-image)."""
    seed: int = 0
    """Row i of a call uses seed + i unless seeds are given explicitly."""
    check_done_every: int = 1
    """Steps between checks whether every row finished (a host sync on accelerators)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_images < 0 or self.min_images < 0:
            raise ValueError("max_images and min_images must be >= 0")
        if self.check_done_every < 1:
            raise ValueError("check_done_every must be >= 1")


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
            self, use_graphs=decode == "graph", key_block=key_block
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

    def last_logits(
        self, tokens: torch.Tensor, columns: tuple[int, int] | None, *, span: int | None = None
    ) -> torch.Tensor:
        """(R, T) tokens through the cache -> (R, V) logits of the last position (or ``columns``);
        ``span``: a static step over that many cached keys."""
        if span is None:
            feats = self.model.extract_features(tokens, cache=self.cache)[:, -1]  # (R, E): last position only
        else:
            feats = self.model.extract_features(tokens, cache=self.cache, span=span)[:, -1]
        if columns is None:
            return self.model.output_layer(feats)  # (R, V)
        # Image steps only need the image-code rows of the tied projection (8192 of ~65k).
        weight = self.model.decoder.output_projection.weight[columns[0] : columns[1]]
        return torch.nn.functional.linear(feats, weight)  # (R, hi - lo)

    def prefill(self, tokens: torch.Tensor, *, columns: tuple[int, int] | None = None) -> torch.Tensor:
        """(R, T) left-padded prompts -> (R, V) next-token logits (or the ``columns`` [lo, hi) only)."""
        if not self.use_cache:
            self._seq = tokens
        return self.last_logits(tokens, columns)

    def decode_one_token(self, tokens: torch.Tensor, *, columns: tuple[int, int] | None = None) -> torch.Tensor:
        """(R, 1) tokens -> (R, V) next-token logits (uncached mode reruns the whole sequence; static
        modes run a fixed-shape step)."""
        if self.static is not None:
            return self.static.logits(tokens, columns)
        if self.use_cache:
            return self.last_logits(tokens, columns)
        assert self._seq is not None, "prefill first"
        self._seq = torch.cat([self._seq, tokens], dim=1)
        return self.last_logits(self._seq, columns)

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

    # ---- token choice --------------------------------------------------------------------------
    def choose_tokens(
        self, logits: torch.Tensor, *, state: MixedModalState, seeds: torch.Tensor, step: int,
        seen: torch.Tensor, config: GenerationConfig, columns: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """(R, V) logits of all rows (or their ``columns`` [lo, hi)) -> (B,) next token per prompt."""
        B = state.mode.shape[0]
        lo, hi = columns if columns is not None else (0, self.vocab_size)
        cond = logits[:B].float()  # (B, V)
        image_rows = state.image_rows()  # (B,)
        scores = cond
        if config.guidance and logits.shape[0] == 2 * B:
            guided = blend(cond, logits[B:].float(), alpha=config.guidance_scale)
            scores = torch.where(image_rows[:, None], guided, cond)
        if config.text.repetition_penalty != 1.0:
            penalised = apply_repetition_penalty(
                scores, seen=seen[:, lo:hi], penalty=config.text.repetition_penalty
            )
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

    # ---- the loop ------------------------------------------------------------------------------
    def decode_n_tokens(
        self, logits: torch.Tensor, *, state: MixedModalState, seeds: torch.Tensor, seen: torch.Tensor,
        config: GenerationConfig, num_steps: int,
        on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
        columns_of_first: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Up to ``num_steps`` tokens per prompt, starting from the prefill ``logits`` -> (B, steps);
        ``columns_of_first``: the columns those logits hold (``logit_columns``)."""
        if self.static is not None:
            return self.static.decode(
                logits, state=state, seeds=seeds, seen=seen, config=config, num_steps=num_steps,
                on_step=on_step, columns_of_first=columns_of_first,
            )
        B = state.mode.shape[0]
        rows = torch.arange(B, device=logits.device)
        out = torch.full((B, num_steps), self.pad, dtype=torch.int64, device=logits.device)
        columns = columns_of_first
        for step in range(num_steps):
            image_rows = state.image_rows()
            tokens = self.choose_tokens(
                logits, state=state, seeds=seeds, step=step, seen=seen, config=config, columns=columns
            )
            out[:, step] = tokens
            state.advance(tokens)
            seen[rows, tokens] = True
            if on_step is not None:
                on_step(tokens, image_rows)
            if step + 1 == num_steps:
                break
            if (step + 1) % config.check_done_every == 0 and bool(state.done.all()):
                break
            feed = tokens.repeat(logits.shape[0] // B)  # same token to the cond and uncond row
            columns = self.logit_columns(state)
            logits = self.decode_one_token(feed[:, None], columns=columns)
        return out

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
        rules = MixedModalRules.from_vocab(
            self.vocab, vocab_size=self.vocab_size, max_new_tokens=config.max_new_tokens,
            max_images=config.max_images, min_images=config.min_images,
            force_image_first=config.force_image_first,
        )
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

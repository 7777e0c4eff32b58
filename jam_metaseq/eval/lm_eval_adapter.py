"""lm-evaluation-harness model ``jam``: zero-shot text tasks for any JAM checkpoint (paper §3.2.1,
Table 1: PIQA, ARC-Easy/Challenge, StoryCloze, Winograd, Winogrande).

Importing this module registers ``JamLM`` as ``jam`` in lm_eval's model registry. lm_eval 0.4.13 has
no plugin entry point for models, so the bare ``lm_eval --model jam`` does not find it; use one of

    jam-eval lm-eval --model-args checkpoint=CKPT --tasks piqa_local --data-dir DIR   (our CLI)
    python -m jam_metaseq.eval.lm_eval_adapter --model jam --model_args checkpoint=CKPT ...
        (lm_eval's own CLI, every flag of it, with ``jam`` registered first)
    import jam_metaseq.eval.lm_eval_adapter; lm_eval.simple_evaluate(model="jam", ...)

Model arguments (``--model_args k=v,...``): ``checkpoint`` (path, read by
``checkpoints_tools.load_model``), ``tokenizer`` (text tokenizer spec; default: the
manifest's ``text_tokenizer``), ``config`` / ``vocab`` (JSON files overriding the checkpoint's),
``batch_size`` (int or ``auto`` = 8), ``max_length`` (default: the model's max_positions),
``device``, ``dtype`` (float32 | bfloat16 | float16), ``trust_pickle``. In-process callers may pass
``model=``, ``manifest=`` and ``text_tokenizer=`` objects instead of paths.

Scoring. Text is encoded with the parents' text tokenizer, ids shifted by ``vocab.text_start``
(``jam_metaseq.data.tokenizers``), exactly as the training data were. ``context + continuation`` is
a document scored by the evaluation rule (``jam_metaseq.eval.context.document_windows``, the rule of
``jam-eval ppl`` and ``jam run``): alone, from position 0, nothing before it, as training presents a
document that starts a block. ``loglikelihood`` sums ``log p`` of the continuation's tokens, each
predicted from the last ``max_length`` tokens before it (a context too long for the window loses its
oldest tokens); ``is_greedy`` says whether every scored token is the argmax. An empty context
(lm_eval then passes its ``prefix_token_id``, which this model does not use): the continuation is
the whole document, so its first token is context and is not scored. ``loglikelihood_rolling``
scores a string's every token but the first, in windows of ``max_length`` (stride = max_length).
``generate_until`` is not provided (Table 1 needs none; use ``jam-generate`` for generation).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry

from jam_metaseq.errors import JamError
from jam_metaseq.eval.context import document_windows
from jam_metaseq.eval.ppl import score_windows
from jam_metaseq.vocab import VocabManifest

MODEL_NAME = "jam"
DEFAULT_BATCH_SIZE = 8


def _as_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "y")
    return bool(v)


class UnsupportedRequestError(JamError, NotImplementedError):
    """A task asks for a request type the adapter does not serve (free-form generation)."""


class JamLM(TemplateLM):
    """lm_eval ``LM`` over a JAM model (parent, JAM-Uniform, JAM-Width or JAM-Cross)."""

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        tokenizer: str | None = None,
        config: str | None = None,
        vocab: str | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_length: int | str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        trust_pickle: bool | str = False,
        model: torch.nn.Module | None = None,
        manifest: VocabManifest | None = None,
        text_tokenizer: Any = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        unused.pop("max_batch_size", None)
        if unused:
            raise ValueError(f"jam: unknown model argument(s) {sorted(unused)}")
        if model is None:
            if checkpoint is None:
                raise ValueError("jam: model_args needs checkpoint=PATH")
            from checkpoints_tools.load import load_model

            model, _, manifest = load_model(checkpoint, config=config, vocab=vocab, require_vocab=True,
                                            trust_pickle=_as_bool(trust_pickle))
        elif manifest is None:
            raise ValueError("jam: an in-process model needs manifest=")
        assert manifest is not None
        if text_tokenizer is None:
            spec = tokenizer or manifest.text_tokenizer
            if not spec:
                raise ValueError("jam: no text tokenizer: pass tokenizer=SPEC (the manifest names none)")
            from jam_metaseq.data.tokenizers import load_text_tokenizer

            text_tokenizer = load_text_tokenizer(spec)
        if int(text_tokenizer.vocab_size) > manifest.text_size:
            raise ValueError(f"jam: text tokenizer has {text_tokenizer.vocab_size} ids but the vocabulary "
                             f"manifest holds {manifest.text_size} text ids")
        dev = torch.device(device) if device else next(model.parameters()).device
        if dev.type == "cuda" and not torch.cuda.is_available():
            dev = torch.device("cpu")  # lm_eval's CLI defaults to cuda:0
        self.model = model.to(device=dev, dtype=getattr(torch, dtype)).eval()
        self.vocab = manifest
        self.text_tokenizer = text_tokenizer
        self._device = dev
        cfg_max = int(getattr(model.cfg, "max_positions"))
        self._max_length = cfg_max if max_length in (None, "", "None") else int(max_length)
        if not 1 <= self._max_length <= cfg_max:
            raise ValueError(f"jam: max_length {self._max_length} must be in [1, {cfg_max}]")
        if batch_size in (None, "", "auto") or (isinstance(batch_size, str) and batch_size.startswith("auto")):
            self.batch_size = DEFAULT_BATCH_SIZE
        else:
            self.batch_size = int(batch_size)

    # ---- what TemplateLM asks for ------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.vocab.eos

    @property
    def prefix_token_id(self) -> int:
        """What lm_eval puts as the context of an empty-context request; recognised and dropped
        (the evaluation rule puts nothing before a document)."""
        return self.vocab.eos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.text_tokenizer, "spec", type(self.text_tokenizer).__name__))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return [int(i) + self.vocab.text_start for i in self.text_tokenizer.encode(string)]

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.text_tokenizer.decode([t - self.vocab.text_start for t in tokens if self.vocab.is_text(t)])

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        windows, owner = [], []
        for i, (key, ctx_enc, cont_enc) in enumerate(requests):
            if len(cont_enc) > self.max_length:
                raise ValueError(f"jam: continuation of {len(cont_enc)} tokens exceeds max_length {self.max_length}")
            ctx = [] if key is not None and key[0] == "" else list(ctx_enc)  # lm_eval's prefix for ""
            doc = ctx + list(cont_enc)
            ws = document_windows(doc, max_len=self.max_length, stride=self.max_length,
                                  first_target=max(1, len(ctx)), seq=i)
            windows.extend(ws)
            owner.extend([i] * len(ws))
        scored = score_windows(self.model, windows, padding_idx=self.model.cfg.padding_idx,
                               batch_size=self.batch_size, device=self.device,
                               progress=not disable_tqdm, desc="loglikelihood")
        sums, greedy_all = [0.0] * len(requests), [True] * len(requests)
        for i, (lp, greedy) in zip(owner, scored):
            sums[i] += float(lp.sum())
            greedy_all[i] = greedy_all[i] and bool(greedy.all())
        out = []
        for (key, _, _), lp_sum, greedy in zip(requests, sums, greedy_all):
            res = (lp_sum, greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
            out.append(res)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        windows = []
        for i, req in enumerate(requests):
            (string,) = req.args
            windows.extend(document_windows(self.tok_encode(string), max_len=self.max_length, seq=i))
        scored = score_windows(self.model, windows, padding_idx=self.model.cfg.padding_idx,
                               batch_size=self.batch_size, device=self.device,
                               progress=not disable_tqdm, desc="loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for w, (lp, _) in zip(windows, scored):
            totals[w.seq] += float(lp.sum())
        for req, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, t)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        raise UnsupportedRequestError(
            "jam: generate_until is not implemented; the Table 1 tasks are multiple-choice "
            "(loglikelihood). Use jam-generate for free-form generation.")


def register() -> None:
    """Register ``JamLM`` as ``jam`` (idempotent; tolerates a re-import of this module)."""
    current = model_registry._objs.get(MODEL_NAME)  # noqa: SLF001 - lm_eval has no public 'replace'
    if current is JamLM:
        return
    if current is not None:
        model_registry._objs.pop(MODEL_NAME)  # noqa: SLF001 - an older class object of this module
    model_registry.register(MODEL_NAME)(JamLM)


register()


def main(argv: list[str] | None = None) -> None:
    """lm_eval's own CLI with ``jam`` registered: ``python -m jam_metaseq.eval.lm_eval_adapter ...``."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()

"""Perplexity of a JAM model on held-out sequences (paper §3.2, Tables 2-5).

Text perplexity ("Wikipedia PPL", Tables 3-4) and image-caption perplexity ("MS-COCO PPL",
Tables 2-5) are the same computation on different data; this module defines it once.

What is averaged
    Each sequence is scored on its own, left to right, exactly as serialised by
    ``jam_metaseq.data.documents`` (text ids, ``<break> img_0 .. img_{n-1} <break>`` per image, a
    final ``<eos>``). No CM3 masking is applied at evaluation time. A ``prefix`` token (default
    ``<eos>``, the document separator the model saw before every document during packed training;
    also what OPT/metaseq condition the first token on) is put in front, so every token of the
    sequence, including the first, is a prediction target. A target is counted when its loss mask
    is True (all True unless the caller passes masks, e.g. to score only the response of an
    instruction document). Then

        NLL = - sum over counted targets of log p(x_t | x_<t)      (natural log)
        PPL = exp(NLL / number of counted targets)

    i.e. one token-weighted mean over the whole data set (not a mean of per-sequence PPLs). The same
    sums are also split by the class of the *target* token: ``text`` (ids in the text range),
    ``image`` (image codes) and ``other`` (``<eos>``, ``<break>``, sentinels ...), each with its own
    PPL; the overall PPL counts all three. For image-caption data the overall figure is the
    MS-COCO-style number (caption + image + framing tokens); the text and image splits are reported
    alongside. Put the caption before the image in the document for text-to-image PPL.

Windows for sequences longer than the context
    Let ``x = [prefix] + tokens`` and number the targets ``t = 0 .. N-1`` (target t is ``x[t+1]``,
    predicted from ``x[:t+1]``). Targets are cut into consecutive chunks of ``stride`` targets
    (``stride <= max_len``, default ``max_len``). The chunk of targets ``[a, b)`` is scored with the
    input window ``x[max(0, b - max_len) : b]``: the model sees at most ``max_len`` tokens, positions
    restart at every window, and each target is predicted exactly once. With ``stride = max_len``
    windows do not overlap (the last one reaches back to a full ``max_len`` of context); a smaller
    stride gives every target at least ``max_len - stride`` tokens of context at a higher cost.
    Sequences of at most ``max_len`` targets are one window, the whole sequence.

Batching: windows of all sequences are sorted by length and right-padded with ``padding_idx``
(the model masks pad keys and counts positions over non-pad tokens, so padding changes nothing).
Log-probabilities are computed in fp32 whatever the model's dtype.

Public API::

    perplexity(model, sequences, *, vocab, batch_size=8, max_len=None, stride=None,
               prefix="eos", masks=None, progress=False) -> dict
    score_windows(model, windows, *, padding_idx, batch_size, device=None, progress=False)
        -> list[(logprob (n,), greedy (n,))]     (the shared scoring kernel, also used by lm-eval)
    rolling_windows(tokens, *, prefix, max_len, stride) -> list[Window]
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jam_metaseq.vocab import VocabManifest

TOKEN_CLASSES = ("text", "image", "other")


@dataclass(frozen=True)
class Window:
    """One forward pass: ``inputs`` (L,) and the last ``num_scored`` positions' next-token targets."""

    inputs: list[int]
    """Input ids, at most ``max_len`` of them."""
    targets: list[int]
    """Targets of the scored positions (len = num_scored): ``targets[j]`` follows input position
    ``len(inputs) - num_scored + j``."""
    seq: int = 0
    """Which sequence the window belongs to."""
    start: int = 0
    """Index (into the sequence's targets) of the first scored target."""

    @property
    def num_scored(self) -> int:
        return len(self.targets)


def rolling_windows(tokens: Sequence[int], *, prefix: int | None, max_len: int, stride: int | None = None,
                    seq: int = 0) -> list[Window]:
    """Cut one sequence into scoring windows (rule in the module docstring)."""
    stride = max_len if stride is None else stride
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in [1, max_len={max_len}], got {stride}")
    x = ([] if prefix is None else [int(prefix)]) + [int(t) for t in tokens]
    n_targets = len(x) - 1
    out = []
    for a in range(0, max(n_targets, 0), stride):
        b = min(a + stride, n_targets)
        lo = max(0, b - max_len)
        out.append(Window(inputs=x[lo:b], targets=x[a + 1 : b + 1], seq=seq, start=a))
    return out


@torch.no_grad()
def score_windows(
    model: nn.Module, windows: Sequence[Window], *, padding_idx: int, batch_size: int,
    device: torch.device | str | None = None, progress: bool = False, desc: str = "scoring",
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per window: (log p(target) float64 (n,), target == argmax bool (n,)), in input order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        device = next(model.parameters()).device
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].inputs))  # longest first
    results: list[Any] = [None] * len(windows)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(windows), desc=desc, unit="win", file=sys.stderr, dynamic_ncols=True)
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            T = len(windows[idx[0]].inputs)
            batch = torch.full((len(idx), T), padding_idx, dtype=torch.long)
            for r, i in enumerate(idx):
                w = windows[i]
                if padding_idx in w.inputs:
                    raise ValueError(f"sequence {w.seq} contains the pad id {padding_idx}: it would be masked")
                batch[r, : len(w.inputs)] = torch.tensor(w.inputs, dtype=torch.long)
            logits = model(batch.to(device))  # (B, T, V)
            for r, i in enumerate(idx):
                w = windows[i]
                L, n = len(w.inputs), w.num_scored
                rows = logits[r, L - n : L].float()  # (n, V): positions whose next token is a target
                logp = F.log_softmax(rows, dim=-1)
                tgt = torch.tensor(w.targets, dtype=torch.long, device=rows.device)
                lp = logp.gather(1, tgt[:, None])[:, 0]
                greedy = rows.argmax(dim=-1).eq(tgt)
                results[i] = (lp.double().cpu().numpy(), greedy.cpu().numpy())
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    return results


def _model_max_positions(model: nn.Module) -> int:
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "max_positions"):
        raise ValueError("max_len not given and the model has no cfg.max_positions")
    return int(cfg.max_positions)


def _model_padding_idx(model: nn.Module) -> int:
    cfg = getattr(model, "cfg", None)
    return int(getattr(cfg, "padding_idx", 1))


def _summary(nll: float, count: int) -> dict[str, Any]:
    return {"nll": nll, "tokens": count, "mean_nll": nll / count if count else float("nan"),
            "ppl": math.exp(nll / count) if count else float("nan")}


def perplexity(
    model: nn.Module,
    sequences: Iterable[Sequence[int] | np.ndarray | torch.Tensor],
    *,
    vocab: VocabManifest,
    batch_size: int = 8,
    max_len: int | None = None,
    stride: int | None = None,
    prefix: str | int | None = "eos",
    masks: Iterable[Sequence[bool] | np.ndarray] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Token-weighted perplexity of ``model`` over ``sequences`` (definition in the module docstring).

    ``prefix``: ``"eos"`` (default), ``"bos"``, an id, or None (then the first token is context only).
    ``masks``: optional per-sequence bool arrays aligned with the sequences; False = not counted.
    Returns ``{"ppl", "nll", "tokens", "mean_nll", "sequences", "windows", "max_len", "stride",
    "text": {...}, "image": {...}, "other": {...}}`` (each split has nll, tokens, mean_nll, ppl).
    """
    if max_len is None:
        max_len = _model_max_positions(model)
    limit = getattr(getattr(model, "cfg", None), "max_positions", None)
    if limit is not None and max_len > limit:
        raise ValueError(f"max_len {max_len} exceeds the model's max_positions {limit}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    prefix_id = {"eos": vocab.eos, "bos": vocab.bos, None: None}.get(prefix, prefix)  # type: ignore[arg-type]
    seqs = [np.asarray(s.cpu() if isinstance(s, torch.Tensor) else s, dtype=np.int64).reshape(-1) for s in sequences]
    mask_list = None if masks is None else [np.asarray(m, dtype=bool).reshape(-1) for m in masks]
    if mask_list is not None and len(mask_list) != len(seqs):
        raise ValueError(f"{len(mask_list)} masks for {len(seqs)} sequences")
    windows: list[Window] = []
    for j, s in enumerate(seqs):
        if s.size and (s.min() < 0 or s.max() >= vocab.size):
            raise ValueError(f"sequence {j}: token id {int(s.max() if s.max() >= vocab.size else s.min())} "
                             f"outside the vocabulary [0, {vocab.size})")
        if mask_list is not None and mask_list[j].size != s.size:
            raise ValueError(f"sequence {j}: mask has {mask_list[j].size} entries for {s.size} tokens")
        windows.extend(rolling_windows(s.tolist(), prefix=prefix_id, max_len=max_len, stride=stride, seq=j))
    was_training = model.training
    model.eval()
    try:
        scored = score_windows(model, windows, padding_idx=_model_padding_idx(model), batch_size=batch_size,
                               device=device, progress=progress, desc="ppl")
    finally:
        model.train(was_training)
    sums = {c: 0.0 for c in TOKEN_CLASSES}
    counts = {c: 0 for c in TOKEN_CLASSES}
    for w, (lp, _) in zip(windows, scored):
        tgt = np.asarray(w.targets, dtype=np.int64)
        keep = np.ones(tgt.size, dtype=bool)
        if mask_list is not None:
            # target t of sequence j is token index t (with a prefix) or t + 1 (without one)
            off = w.start + (0 if prefix_id is not None else 1)
            keep = mask_list[w.seq][off : off + tgt.size]
        is_text = np.asarray(vocab.is_text(tgt), dtype=bool)
        is_image = np.asarray(vocab.is_image(tgt), dtype=bool)
        for cls, sel in (("text", is_text), ("image", is_image), ("other", ~(is_text | is_image))):
            sel = sel & keep
            sums[cls] -= float(lp[sel].sum())
            counts[cls] += int(sel.sum())
    total_nll = sum(sums.values())
    total = sum(counts.values())
    out: dict[str, Any] = _summary(total_nll, total)
    out.update(sequences=len(seqs), windows=len(windows), max_len=max_len,
               stride=max_len if stride is None else stride, prefix=prefix_id)
    for c in TOKEN_CLASSES:
        out[c] = _summary(sums[c], counts[c])
    return out


PPL_KINDS = ("text", "caption", "auto")


def evaluate_ppl_files(
    *,
    checkpoint: str,
    data: Sequence[str],
    kind: str = "auto",
    tokenizer: str | None = None,
    config: str | None = None,
    vocab: str | None = None,
    batch_size: int = 8,
    max_len: int | None = None,
    stride: int | None = None,
    prefix: str | int | None = "eos",
    use_loss_mask: bool = False,
    limit: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    trust_pickle: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """``jam-eval ppl``: load a checkpoint, read each data file, return ``{file: perplexity dict}``.

    ``kind``: ``text`` (Wikipedia-style: refuses documents with images), ``caption`` (MS-COCO-style:
    every document must hold an image), ``auto`` (no check). ``use_loss_mask``: count only targets
    whose loss mask is True (instruction data: the response).
    """
    from checkpoints_tools.load import load_model
    from jam_metaseq.eval.io import EvalInputError, read_sequences

    if kind not in PPL_KINDS:
        raise EvalInputError(f"kind must be one of {PPL_KINDS}, got {kind!r}")
    model, cfg, manifest = load_model(checkpoint, config=config, vocab=vocab, require_vocab=True,
                                      dtype=getattr(torch, dtype), device=device, trust_pickle=trust_pickle)
    text_tok = None
    spec = tokenizer or manifest.text_tokenizer
    if spec:
        from jam_metaseq.data.tokenizers import load_text_tokenizer

        text_tok = load_text_tokenizer(spec)
    results: dict[str, Any] = {}
    for path in data:
        seqs, masks = read_sequences(path, vocab=manifest, text_tokenizer=text_tok, limit=limit)
        if not seqs:
            raise EvalInputError(f"{path}: no documents")
        for j, s in enumerate(seqs):
            has_image = bool(np.asarray(manifest.is_image(s)).any())
            if kind == "text" and has_image:
                raise EvalInputError(f"{path}: document {j} holds image tokens but --kind text was asked")
            if kind == "caption" and not has_image:
                raise EvalInputError(f"{path}: document {j} holds no image but --kind caption was asked")
        r = perplexity(model, seqs, vocab=manifest, batch_size=batch_size, max_len=max_len, stride=stride,
                       prefix=prefix, masks=masks if use_loss_mask else None, device=device, progress=progress)
        r["kind"] = kind
        r["checkpoint"] = str(checkpoint)
        r["arch"] = getattr(cfg, "arch", type(cfg).__name__)
        results[str(path)] = r
    return results

"""Perplexity of a JAM model on held-out sequences (paper §3.2, Tables 2-5).

Text perplexity ("Wikipedia PPL", Tables 3-4) and image-caption perplexity ("MS-COCO PPL",
Tables 2-5) are the same computation on different data; this module defines it once.

What is averaged
    Each sequence is a document scored in the context the evaluation rule gives it
    (``jam_metaseq.eval.context``, the one home of that rule: alone, from position 0, nothing
    before it, its first token context, every later token a target), exactly as serialised by
    ``jam_metaseq.data.documents`` (text ids, ``<break> img_0 .. img_{n-1} <break>`` per image, a
    final ``<eos>``). No CM3 masking is applied at evaluation time. A target is counted when its loss
    mask is True (all True unless the caller passes masks, e.g. to score only the response of an
    instruction document). Then

        NLL = - sum over counted targets of log p(x_t | x_<t)      (natural log)
        PPL = exp(NLL / number of counted targets)

    i.e. one token-weighted mean over the whole data set (not a mean of per-sequence PPLs). The same
    sums are also split by the class of the *target* token: ``text`` (ids in the text range),
    ``image`` (image codes) and ``other`` (``<eos>``, ``<break>``, sentinels ...), each with its own
    PPL; the overall PPL counts all three. For image-caption data the overall figure is the
    MS-COCO-style number (caption + image + framing tokens); the text and image splits are reported
    alongside. Put the caption before the image in the document for text-to-image PPL. Documents
    longer than ``max_len`` are scored in rolling windows (``eval.context``).

Batching: windows of all sequences are sorted by length and right-padded with ``padding_idx``
(the model masks pad keys and counts positions over non-pad tokens, so padding changes nothing).
Log-probabilities are computed in fp32 whatever the model's dtype.

Public API::

    perplexity(model, sequences, *, vocab, batch_size=8, max_len=None, stride=None,
               masks=None, progress=False) -> dict
    evaluate_ppl_files(*, checkpoint, data, ...) -> {file: perplexity dict}   (jam-eval ppl, jam run)
    bits_per_byte(model, texts, *, text_tokenizer, vocab, ...) -> dict   (tokenizer-independent text score)
    score_windows(model, windows, *, padding_idx, batch_size, device=None, progress=False)
        -> list[(logprob (n,), greedy (n,))]     (the shared scoring kernel, also used by lm-eval)
"""

from __future__ import annotations

import math
import sys
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jam_metaseq.eval.context import Window, document_windows
from jam_metaseq.vocab import VocabManifest

TOKEN_CLASSES = ("text", "image", "other")


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
    masks: Iterable[Sequence[bool] | np.ndarray] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Token-weighted perplexity of ``model`` over the documents ``sequences`` (definition in the
    module docstring; context: ``eval.context.document_windows``).

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
        windows.extend(document_windows(s.tolist(), max_len=max_len, stride=stride, seq=j))
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
            off = w.start + 1  # target t of a document is its token t + 1
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
               stride=max_len if stride is None else stride)
    for c in TOKEN_CLASSES:
        out[c] = _summary(sums[c], counts[c])
    return out


def bits_per_byte(model: nn.Module, texts: Sequence[str], *, text_tokenizer: Any, vocab: VocabManifest,
                  batch_size: int = 8, max_len: int | None = None) -> dict[str, Any]:
    """Bits per UTF-8 byte of plain ``texts`` under ``model`` and its ``text_tokenizer``: the
    ``perplexity`` of each text as ``<s> text </s>`` (so every text token is a target, the first
    one too), its text tokens' NLL in bits over the texts' bytes. Two models with different
    tokenizers are compared on it, not on per-token perplexity (their tokens differ)."""
    seqs = [[vocab.bos, *(vocab.text_start + i for i in text_tokenizer.encode(t)), vocab.eos] for t in texts]
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    if not nbytes:
        raise ValueError("bits_per_byte needs some text")
    out = perplexity(model, seqs, vocab=vocab, batch_size=batch_size, max_len=max_len)
    text = out["text"]
    return {"bits_per_byte": text["nll"] / math.log(2) / nbytes, "bytes": nbytes, "tokens": text["tokens"],
            "bytes_per_token": nbytes / text["tokens"] if text["tokens"] else float("nan")}


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
    use_loss_mask: bool = False,
    limit: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    trust_pickle: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint once, read each data file, return ``{file: perplexity dict}`` (each with
    ``kind``, ``checkpoint``, ``arch`` and ``params`` added): ``jam-eval ppl`` and ``jam run``'s
    evaluation stage (module-level, so a SLURM job can run it).

    ``kind``: ``text`` (Wikipedia-style: refuses documents with images), ``caption`` (MS-COCO-style:
    every document must hold an image), ``auto`` (no check). ``use_loss_mask``: count only targets
    whose loss mask is True (instruction data: the response). The text tokenizer (``tokenizer``,
    else the manifest's) is loaded only for JSONL files.
    """
    from checkpoints_tools.load import load_model
    from jam_metaseq.eval.io import EvalInputError, is_binarized, read_sequences
    from jam_metaseq.models import count_parameters

    if kind not in PPL_KINDS:
        raise EvalInputError(f"kind must be one of {PPL_KINDS}, got {kind!r}")
    model, cfg, manifest = load_model(checkpoint, config=config, vocab=vocab, require_vocab=True,
                                      dtype=getattr(torch, dtype), device=device, trust_pickle=trust_pickle)
    text_tok = None
    spec = tokenizer or manifest.text_tokenizer
    if spec and not all(is_binarized(path) for path in data):
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
                       masks=masks if use_loss_mask else None, device=device, progress=progress)
        r["kind"] = kind
        r["checkpoint"] = str(checkpoint)
        r["arch"] = getattr(cfg, "arch", type(cfg).__name__)
        r["params"] = count_parameters(cfg)
        results[str(path)] = r
    return results

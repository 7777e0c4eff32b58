"""Inputs of the evaluation tools: a checkpoint as (model, config, vocabulary) and evaluation data
as token sequences (paper §3.2: the checkpoints evaluated in Tables 1-5).

Checkpoints
    ``load_checkpoint(path)`` first asks the checkpoint helper (``checkpoints_tools.load_model``),
    which reads every layout the project writes or meets (jam-ckpt output, metaseq/fairseq parts,
    FSDP shards, HF OPT); ``vocab=`` then overrides the manifest it finds. When the helper is not
    installed, or when the caller names the config explicitly, a small local reader is used: a
    ``.pt`` file (or a folder holding exactly one) whose ``model`` key is a metaseq-layout state
    dict, with

    - the model config from ``config=`` (a JSON file of ``config_to_json``), else the checkpoint's
      ``jam_config`` / ``config`` key (a dict with ``type``), else ``config.json`` beside it;
    - the vocabulary manifest from ``vocab=``, else the checkpoint's ``jam_vocab`` key, else
      ``vocab.json`` / ``manifest.json`` beside it.

    The manifest must match the embedding (``VocabManifest.check_embedding``).

Data
    ``read_sequences(path, ...)``: a JSONL file of documents (``jam_metaseq.data.documents``; images
    given as ``image_tokens``, or as files when an image tokenizer is passed) or the prefix of a
    binarized dataset (``jam-data binarize`` output: ``PREFIX.json`` exists). Every document is one
    sequence, ending with ``<eos>``; loss masks come along (all True except instruction prompts).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from jam_metaseq.errors import JamError, read_json
from jam_metaseq.models import ModelConfig, build_model, config_from_dict
from jam_metaseq.vocab import VocabManifest


class EvalInputError(JamError, ValueError):
    """Bad evaluation input; the message names the file and what is wrong."""


def _find_checkpoint_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        pts = sorted(path.glob("*.pt"))
        if len(pts) == 1:
            return pts[0]
        raise EvalInputError(
            f"{path}: expected one .pt file in the folder, found {len(pts)}"
            + (f" ({', '.join(p.name for p in pts[:5])})" if pts else ""))
    raise EvalInputError(f"{path}: no such checkpoint file or folder")


def _torch_load(path: Path, *, trust_pickle: bool) -> Any:
    try:
        from checkpoints_tools.safe_load import safe_torch_load
    except ImportError:  # the helper package is not installed: plain safe loading
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        import argparse

        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    return safe_torch_load(path, trust_pickle=trust_pickle, mmap=True)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    vocab: str | os.PathLike | None = None,
    trust_pickle: bool = False,
) -> tuple[nn.Module, ModelConfig, VocabManifest]:
    """(model in eval mode, fp32 on CPU; its config; its vocabulary manifest)."""
    path = Path(path)
    if config is None:
        try:
            from checkpoints_tools import load_model  # type: ignore[attr-defined]
        except ImportError:
            load_model = None
        if load_model is not None:
            model, cfg, manifest = load_model(path, trust_pickle=trust_pickle)
            if vocab is not None:
                manifest = VocabManifest.load(vocab)
            if manifest is None:
                raise EvalInputError(f"{path}: the checkpoint carries no vocabulary manifest (no jam_vocab, no "
                                     "vocab.json beside it); pass --vocab")
            try:
                manifest.check_embedding(int(model.decoder.output_projection.weight.shape[0]))
            except ValueError as e:
                raise EvalInputError(f"{path}: {e}") from None
            return model.float().eval(), cfg, manifest
    file = _find_checkpoint_file(path)
    ckpt = _torch_load(file, trust_pickle=trust_pickle)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise EvalInputError(f"{file}: no 'model' state dict in the checkpoint")
    here = file.parent
    cfg_source = file
    if config is not None:
        cfg_source = Path(config)
        cfg_dict = read_json(cfg_source, what="model config")
    elif isinstance(ckpt.get("jam_config"), dict):
        cfg_dict = ckpt["jam_config"]
    elif isinstance(ckpt.get("config"), dict) and "type" in ckpt["config"]:
        cfg_dict = ckpt["config"]
    elif (here / "config.json").is_file():
        cfg_source = here / "config.json"
        cfg_dict = read_json(cfg_source, what="model config")
    else:
        raise EvalInputError(
            f"{file}: no model config (no 'jam_config' key, no config.json beside it); pass --config "
            "with a JSON written by jam_metaseq.models.config_to_json")
    try:
        cfg = config_from_dict(cfg_dict)
    except (TypeError, ValueError) as e:
        raise EvalInputError(f"{cfg_source}: bad model config ({e})") from None
    if vocab is not None:
        manifest = VocabManifest.load(vocab)
    elif isinstance(ckpt.get("jam_vocab", ckpt.get("vocab")), dict):
        manifest = VocabManifest.from_dict(ckpt.get("jam_vocab", ckpt.get("vocab")), source=str(file))
    else:
        side = [here / n for n in ("vocab.json", "manifest.json") if (here / n).is_file()]
        if not side:
            raise EvalInputError(f"{file}: no vocabulary manifest (no 'vocab' key, no vocab.json beside it); "
                                 "pass --vocab")
        manifest = VocabManifest.load(side[0])
    model = build_model(cfg)
    # drop keys a trainer adds that the model does not hold (none today; keeps strict errors useful)
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, strict=False)
    missing = [k for k in missing if k != "decoder.output_projection.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise EvalInputError(
            f"{file}: state dict does not match the config: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    try:
        manifest.check_embedding(int(model.decoder.output_projection.weight.shape[0]))
    except ValueError as e:
        raise EvalInputError(f"{file}: {e}") from None
    return model.float().eval(), cfg, manifest


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, vocab: VocabManifest) -> None:
    """A single-file checkpoint both readers accept (``model``, ``jam_config``, ``jam_vocab``), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "jam_config": model.cfg.to_dict(), "jam_vocab": vocab.to_dict()}, tmp)
    os.replace(tmp, path)


def read_sequences(
    path: str | os.PathLike,
    *,
    vocab: VocabManifest,
    text_tokenizer: Any = None,
    image_tokenizer: Any = None,
    limit: int | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Documents of a JSONL file or binarized dataset: (token arrays, loss-mask arrays)."""
    p = Path(path)
    seqs: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    if Path(f"{p}.json").is_file() and not str(p).endswith(".jsonl"):
        from jam_metaseq.data.binarize import open_dataset

        try:
            ds = open_dataset(p, vocab=vocab)
        except (ValueError, FileNotFoundError) as e:
            raise EvalInputError(str(e)) from None
        n = ds.num_documents if limit is None else min(limit, ds.num_documents)
        for j in range(n):
            d = ds.document(j)
            seqs.append(d["tokens"])
            masks.append(d["loss_mask"])
        return seqs, masks
    if not p.is_file():
        raise EvalInputError(f"{p}: no such JSONL file or binarized dataset (no {p}.json)")
    if text_tokenizer is None:
        raise EvalInputError(f"{p}: a JSONL file needs a text tokenizer (--tokenizer, or text_tokenizer "
                             "in the vocabulary manifest)")
    from jam_metaseq.data.documents import DocumentError, iter_jsonl

    try:
        for rec in iter_jsonl(p, vocab=vocab, text_tokenizer=text_tokenizer, image_tokenizer=image_tokenizer,
                              response_loss_only=True):
            seqs.append(rec.tokens)
            masks.append(rec.loss_mask)
            if limit is not None and len(seqs) >= limit:
                break
    except DocumentError as e:
        raise EvalInputError(str(e)) from None
    return seqs, masks

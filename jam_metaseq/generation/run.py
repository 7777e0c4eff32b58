"""What ``jam-generate`` does, as a library: load a checkpoint and its vocabulary manifest, encode
prompts, generate in batches (paper §3.1 decoding), write JSON lines / Markdown / HTML + PNGs.

Checkpoints are opened with ``checkpoints_tools.readers.open_checkpoint`` (any layout the tools
read: consolidated, MP parts, FSDP shards, safetensors); when that package is missing, a plain
``torch.load`` of a dict with ``model`` and ``jam_config`` is used. The manifest comes from
``--vocab``, else the checkpoint's ``jam_vocab`` entry, else a ``vocab.json`` beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from jam_metaseq.models import build_model, config_from_dict
from jam_metaseq.vocab import VocabManifest

from .answer import Answer
from .engine import Engine, GenerationConfig
from .render import attach_text, save_images, to_html, to_jsonl, to_markdown, write_atomic

PROMPT_PREFIXES = {"eos": "eos", "bos": "bos", "none": None}


@dataclass
class PromptSpec:
    """One prompt as read from the command line or a JSONL file."""

    text: str | None = None
    """Prompt text (encoded with the text tokenizer)."""
    ids: list[int] | None = None
    """Or vocabulary ids, used as given (no prefix added)."""
    seed: int | None = None
    """Seed of this prompt's random stream (default: --seed + its index)."""
    source: str = "<command line>"
    """Where it came from, for error messages."""


def read_prompts_jsonl(path: str | Path) -> list[PromptSpec]:
    """Lines ``{"prompt": str}`` or ``{"prompt_ids": [int, ...]}``, optional ``"seed"``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    specs = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict) or ("prompt" in d) == ("prompt_ids" in d):
            raise ValueError(f"{where}: expected an object with exactly one of 'prompt' or 'prompt_ids'")
        text, ids = d.get("prompt"), d.get("prompt_ids")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{where}: 'prompt' must be a string")
        if ids is not None and not (isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids)):
            raise ValueError(f"{where}: 'prompt_ids' must be a non-empty list of integers")
        seed = d.get("seed")
        if seed is not None and not isinstance(seed, int):
            raise ValueError(f"{where}: 'seed' must be an integer")
        specs.append(PromptSpec(text=text, ids=ids, seed=seed, source=where))
    if not specs:
        raise ValueError(f"{path}: no prompts")
    return specs


def _load_state(checkpoint: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, torch.Tensor]]:
    """(config dict, vocab dict, state dict) from any checkpoint layout."""
    try:
        from checkpoints_tools.readers import open_checkpoint
    except ImportError:  # the checkpoint tools are optional for generation
        open_checkpoint = None
    if open_checkpoint is not None:
        reader = open_checkpoint(checkpoint)
        cfg = reader.config().to_dict()
        return cfg, reader.vocab_dict(), dict(reader.items())
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{checkpoint}: not a checkpoint dict with a 'model' key")
    return ckpt.get("jam_config"), ckpt.get("jam_vocab"), ckpt["model"]


def load_model_and_vocab(
    checkpoint: str | Path, *, vocab_path: str | Path | None = None, device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.nn.Module, VocabManifest]:
    """Build the model of ``checkpoint`` (strict state-dict load) and its vocabulary manifest."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    cfg_dict, vocab_dict, state = _load_state(checkpoint)
    if cfg_dict is None:
        raise ValueError(f"{checkpoint}: no 'jam_config' in the checkpoint; write it with jam-ckpt")
    if vocab_path is not None:
        vocab = VocabManifest.load(vocab_path)
        where = str(vocab_path)
    elif vocab_dict is not None:
        vocab = VocabManifest.from_dict(vocab_dict, source=f"{checkpoint} (jam_vocab)")
        where = f"{checkpoint} (jam_vocab)"
    else:
        beside = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "vocab.json"
        if not beside.is_file():
            raise FileNotFoundError(
                f"no vocabulary manifest for {checkpoint}: pass --vocab, or put vocab.json beside it"
            )
        vocab = VocabManifest.load(beside)
        where = str(beside)
    rows = state.get("decoder.embed_tokens.weight")
    if rows is None:
        raise ValueError(f"{checkpoint}: no 'decoder.embed_tokens.weight' tensor")
    if rows.shape[0] != vocab.size:
        raise ValueError(
            f"vocab manifest {where} has {vocab.size} ids but the checkpoint {checkpoint}'s embedding "
            f"has {rows.shape[0]} rows"
        )
    cfg = config_from_dict(cfg_dict)
    with torch.device("meta"):
        model = build_model(cfg)
    missing = set(model.state_dict()) - set(state)
    unexpected = set(state) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint}: state dict does not fit {cfg.arch}: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    if hasattr(model.decoder, "output_projection"):  # assign=True breaks the tie: restore it
        model.decoder.output_projection.weight = model.decoder.embed_tokens.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{checkpoint}: tensors not filled by the checkpoint: {left[:3]}")
    return model.to(device=device, dtype=dtype).eval(), vocab


def encode_prompts(
    specs: Sequence[PromptSpec], *, vocab: VocabManifest, tokenizer: Any | None, prefix: str | None = "eos",
) -> list[list[int]]:
    """Text -> [prefix] + (tokenizer ids + text_start); ``prompt_ids`` pass through unchanged.

    The default prefix is ``<eos>``: the data pipeline separates documents with ``<eos>`` (no
    ``<s>``), so an answer starts where a training document starts.
    """
    out = []
    for s in specs:
        if s.ids is not None:
            out.append(list(s.ids))
            continue
        if tokenizer is None:
            raise ValueError(f"{s.source}: a text prompt needs --tokenizer (or the manifest's text_tokenizer)")
        ids = [vocab.text_start + i for i in tokenizer.encode(s.text or "")]
        bad = [i for i in ids if not vocab.is_text(i)]
        if bad:
            raise ValueError(
                f"{s.source}: the tokenizer gives ids beyond the manifest's text_size {vocab.text_size}"
            )
        head = [] if prefix is None else [vocab.eos if prefix == "eos" else vocab.bos]
        out.append(head + ids)
    return out


def generate_answers(
    *, checkpoint: str | Path, prompts: Sequence[PromptSpec], config: GenerationConfig,
    vocab_path: str | Path | None = None, tokenizer: str | None = None,
    image_tokenizer: str | None = None, out_dir: str | Path | None = None, batch_size: int = 8,
    device: str = "cpu", dtype: torch.dtype = torch.float32, prompt_prefix: str | None = "eos",
    progress: bool = True,
) -> list[Answer]:
    """Everything ``jam-generate`` does; returns the answers (and writes files under ``out_dir``)."""
    model, vocab = load_model_and_vocab(checkpoint, vocab_path=vocab_path, device=device, dtype=dtype)
    tok = None
    spec = tokenizer or vocab.text_tokenizer
    if spec is not None:
        from jam_metaseq.data.tokenizers import load_text_tokenizer

        tok = load_text_tokenizer(spec)
    decoder = None
    if image_tokenizer is not None:
        from jam_metaseq.image_tokenizer import load_image_tokenizer

        decoder = load_image_tokenizer(image_tokenizer, device=device)
        if tuple(decoder.grid) != tuple(vocab.image_grid) or decoder.n_codes != vocab.image_codes:
            raise ValueError(
                f"image tokenizer {image_tokenizer} has a {tuple(decoder.grid)} grid of {decoder.n_codes} codes "
                f"but the manifest says {tuple(vocab.image_grid)} and {vocab.image_codes}"
            )
    ids = encode_prompts(prompts, vocab=vocab, tokenizer=tok, prefix=prompt_prefix)
    seeds = [s.seed if s.seed is not None else config.seed + i for i, s in enumerate(prompts)]
    engine = Engine(model, vocab=vocab)
    answers: list[Answer] = []
    for start in range(0, len(ids), batch_size):
        answers += engine.generate(
            ids[start : start + batch_size], config=config, seeds=seeds[start : start + batch_size],
            progress=progress,
        )
    for a, s in zip(answers, prompts):
        a.prompt = s.text
    if tok is not None:
        attach_text(answers, tokenizer=tok)
    if out_dir is not None:
        out = Path(out_dir)
        if decoder is not None:
            save_images(answers, image_decoder=decoder, out_dir=out)
        write_atomic(out / "answers.jsonl", to_jsonl(answers))
        write_atomic(out / "answers.md", to_markdown(answers))
        write_atomic(out / "answers.html", to_html(answers))
    return answers

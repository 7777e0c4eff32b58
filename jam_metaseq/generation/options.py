"""The flags of the commands that decode: ``jam-generate``, ``jam chat`` and ``jam serve`` (paper
§3.1 "Decoding Strategies"). Each flag is declared once, in ``OPTIONS``, with the commands that
offer it; ``add_options`` puts a command's rows on its parser (groups ``model`` and ``decoding``),
``generation_config`` turns the parsed flags into the ``GenerationConfig`` of every answer.

The chat commands offer the sampling and guidance flags of ``jam-generate``; the flags about
prompts (how they are framed, how many are decoded together, whether an answer starts with or
forbids an image) are ``jam-generate``'s only.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from jam_metaseq.errors import add_trust_pickle_flag
from jam_metaseq.inputs import (FINITE, NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, SEED,
                                finite_float)

from .config import GenerationConfig
from .engine import DECODE_MODES
from .sampling import SamplingConfig

UNIT_MASS = finite_float(0.0, 1.0, lo_open=True)
"""A nucleus mass: in (0, 1]."""

TOOLS = ("generate", "chat")
"""``generate``: jam-generate; ``chat``: jam chat and jam serve."""

# float64: a reference run whose tokens every decode mode and batch size reproduces (rounding of
# float32 logits can tip a near-tied draw; see docs/TESTING.md).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class Option:
    """One flag: its argparse settings, its help, the commands that offer it."""

    option: str
    group: str
    """``model`` or ``decoding``."""
    help: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    tools: tuple[str, ...] = TOOLS
    help_by_tool: dict[str, str] = field(default_factory=dict)
    """A command's own wording where what the flag does differs in its words (not in its meaning)."""


OPTIONS: tuple[Option, ...] = (
    Option("--vocab", "model", "vocabulary manifest JSON (default: stored in the checkpoint, or vocab.json beside it)"),
    Option("--tokenizer", "model", "text tokenizer: .model (sentencepiece), .json (HF BPE) or 'bytes' (default: the "
           "manifest's text_tokenizer)"),
    Option("--image-tokenizer", "model", "image tokenizer (a VQGAN folder) to decode image codes to PNG (needs --out); "
           "without it images are written as code grids",
           help_by_tool={"chat": "image tokenizer (a VQGAN folder): draws PNGs and reads pictures you send (without "
                                 "it drawn pictures are code grids and sending pictures is off)"}),
    Option("--device", "model", "torch device (default: cpu)", {"default": "cpu"}),
    Option("--dtype", "model", "weights and activations dtype (default: float32; float64 for reference runs)",
           {"default": "float32", "choices": sorted(DTYPES)}),
    Option("--max-new-tokens", "decoding", "generated tokens per answer, images included (lowered to what the "
           "model's context leaves)", {"type": POSITIVE_INT, "default": 1280}),
    Option("--temperature", "decoding", "text temperature (0 = greedy), and image temperature unless "
           "--image-temperature; paper: 1", {"type": NON_NEGATIVE_FLOAT, "default": 1.0}),
    Option("--top-p", "decoding", "text nucleus mass (1 = off), and image unless --image-top-p; paper: 0.8-1",
           {"type": UNIT_MASS, "default": 0.9}),
    Option("--top-k", "decoding", "text top-k (0 = off), and image unless --image-top-k", {"type": NON_NEGATIVE_INT, "default": 0}),
    Option("--repetition-penalty", "decoding", "CTRL penalty on text tokens seen in the prompt and the answer "
           "(1 = off; never on image tokens)", {"type": POSITIVE_FLOAT, "default": 1.0}),
    Option("--image-temperature", "decoding", "image temperature (default: --temperature)", {"type": NON_NEGATIVE_FLOAT}),
    Option("--image-top-p", "decoding", "image nucleus mass (default: --top-p)", {"type": UNIT_MASS}),
    Option("--image-top-k", "decoding", "image top-k (default: --top-k)", {"type": NON_NEGATIVE_INT}),
    Option("--guidance-scale", "decoding", "CFG alpha of Eq. 6 for image tokens; paper: 3.5-4",
           {"type": FINITE, "default": 3.5},
           help_by_tool={"chat": "CFG alpha of Eq. 6 for image tokens (paper: 3.5-4); the unconditional row is the "
                                 "conversation with the current message's text masked (docs/CONVERSATIONS.md)"}),
    Option("--no-guidance", "decoding", "no unconditional rows (half the compute, unguided images)",
           {"action": "store_true"}),
    Option("--images", "decoding", "auto: the model decides; force: start with an image; forbid: text only",
           {"default": "auto", "choices": ["auto", "force", "forbid"]}, tools=("generate",)),
    Option("--max-images", "decoding", "images per answer", {"type": NON_NEGATIVE_INT, "default": 3}),
    Option("--min-images", "decoding", "the answer may not end (<eos>, or <eot> in a chat) until this many images "
           "were written", {"type": NON_NEGATIVE_INT, "default": 0}),
    Option("--seed", "decoding", "answer k samples with seed + k (jam-generate: prompt k, unless its JSONL line "
           "sets a seed; a chat: its k-th answer)", {"type": SEED, "default": 0}),
    Option("--batch-size", "decoding", "prompts decoded together (each pair of CFG rows counts once)",
           {"type": POSITIVE_INT, "default": 8}, tools=("generate",)),
    Option("--decode", "decoding", "decode steps: eager (fastest on CPU), static (fixed shapes, few host syncs) or "
           "graph (static steps replayed as CUDA graphs; falls back to static with a warning off CUDA; measured "
           "19-24x HF generate on an H200); auto = graph on CUDA, eager elsewhere. Same seeds give the same "
           "answers in every mode", {"default": "auto", "choices": ("auto", *DECODE_MODES)}),
)
"""Every flag of the decoding commands, once."""

GROUP_TITLES = {"model": "model", "decoding": "decoding"}


def add_options(parser: argparse.ArgumentParser, tool: str) -> dict[str, Any]:
    """Put ``tool``'s rows of ``OPTIONS`` (and ``--trust-pickle``) on ``parser``; returns the argument
    groups by name, for a command's own flags."""
    if tool not in TOOLS:
        raise ValueError(f"unknown tool {tool!r}; expected one of {TOOLS}")
    groups = {name: parser.add_argument_group(title) for name, title in GROUP_TITLES.items()}
    for o in OPTIONS:
        if tool in o.tools:
            groups[o.group].add_argument(o.option, help=o.help_by_tool.get(tool, o.help), **o.kwargs)
    add_trust_pickle_flag(groups["model"])
    return groups


def generation_config(args: argparse.Namespace, **overrides: Any) -> GenerationConfig:
    """The ``GenerationConfig`` of the parsed flags (flags a command does not offer take their
    defaults: image sampling follows text sampling, images ``auto``); ``overrides`` win."""
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    text = SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=get("top_k", 0),
                          repetition_penalty=get("repetition_penalty", 1.0))
    image = SamplingConfig(
        temperature=args.temperature if get("image_temperature") is None else args.image_temperature,
        top_p=args.top_p if get("image_top_p") is None else args.image_top_p,
        top_k=get("top_k", 0) if get("image_top_k") is None else args.image_top_k)
    images = get("images", "auto")
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, text=text, image=image, guidance_scale=args.guidance_scale,
        guidance=not args.no_guidance, max_images=0 if images == "forbid" else args.max_images,
        min_images=0 if images == "forbid" else args.min_images, force_image_first=images == "force",
        seed=args.seed)
    return dataclasses.replace(config, **overrides) if overrides else config


__all__ = ["DTYPES", "OPTIONS", "Option", "TOOLS", "add_options", "generation_config"]

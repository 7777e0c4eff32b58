"""The hosts' glue around the flag table: which arch names the hosts register and what an arch
function fills in, and the task's options from parsed flags (paper §2.1, §3.1).

The flags themselves, and every map between flags and configs, are ``jam_metaseq.flags`` (one
row per flag, host-free). Here: ``arch_names`` (``jam_cross``, ``jam_cross_{tiny,1_3b,7b}`` ...,
and per model family ``jam_cross_{llama,qwen2,gemma}_tiny``, ``jam_width_gemma_7b``, ``jam_cross_llama3_8b``
...: the JAM architecture and its parents' preset, family fields included), ``apply_arch_defaults``
(a sized arch fills every flag the user did not give from its parent preset; the bare family name
is the 7B size) and ``task_options_from_args``.

The resulting config is stored on the args as ``args.jam_config`` (``cfg.to_dict()``): hosts pickle
their model args into every checkpoint (``cfg["model"]``), so a checkpoint carries its config.
"""

from __future__ import annotations

import argparse

from jam_metaseq import flags
from jam_metaseq.task.items import TaskOptions, parse_mixture
from jam_metaseq.flags import FAMILIES
from jam_metaseq.models.config import preset
from jam_metaseq.objectives.cm3 import CM3Config
from jam_metaseq.vocab import VocabManifest, check_embedding

SIZES = {"tiny": "tiny", "1_3b": "opt_1_3b", "7b": "cm3leon_7b",
         **{p: p for p in ("llama_tiny", "qwen2_tiny", "gemma_tiny", "llama2_7b", "llama3_8b", "qwen2_0_5b",
                           "qwen2_7b", "gemma_2b", "gemma_7b")}}
"""Arch size suffix -> parent preset (``7b`` = the paper's CM3leon-shaped 7B parents; the Llama
family's presets by their own names: ``--arch jam_cross_gemma_7b`` is JAM-Cross of two Gemma-7B)."""
DEFAULT_SIZE = "7b"


def arch_names() -> dict[str, tuple[str, str]]:
    """Every registered arch name -> (family, size): ``jam_cross`` and ``jam_cross_{tiny,1_3b,7b}``..."""
    out = {}
    for fam in FAMILIES:
        out[fam] = (fam, DEFAULT_SIZE)
        for size in SIZES:
            out[f"{fam}_{size}"] = (fam, size)
    return out


def apply_arch_defaults(args: argparse.Namespace, *, family: str, size: str) -> None:
    """Fill every model flag left at None (in place): a parent flag from the size's parent preset,
    an always-on switch with True (metaseq's model_parallel_transformer_lm requires them; our
    models always have them), a JAM-Cross flag with its table default (``flags.MODEL_FLAGS``)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown JAM family {family!r}; expected one of {FAMILIES}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    parent = preset(SIZES[size])
    for f in flags.rows("parent"):
        value = getattr(parent, f.field)
        if getattr(args, f.dest, None) is None and not (f.when_set and value == flags.field_default(f.field)):
            setattr(args, f.dest, f.to_value(value))
    for f in flags.rows("always"):
        if f.cli:
            setattr(args, f.dest, True)
    for f in flags.rows("cross"):
        if f.default is not None and getattr(args, f.dest, None) is None:
            setattr(args, f.dest, f.default)
    args.jam_family = family
    args.jam_size = size


def task_options_from_args(args: argparse.Namespace, vocab: VocabManifest) -> TaskOptions:
    """TaskOptions from parsed task flags (+ the host's ``--seed``)."""
    max_spans = args.cm3_max_spans if args.cm3_max_spans is not None else vocab.num_sentinels
    return TaskOptions(
        data=args.data.split(":")[0], tokens_per_sample=args.tokens_per_sample,
        mixture=parse_mixture(args.mixture),
        cm3=CM3Config(mode=args.cm3_mode, lam=args.cm3_lambda, min_spans=min(args.cm3_min_spans, max_spans),
                      max_spans=max_spans, cross_documents=args.cm3_cross_documents),
        cm3_on_valid=args.cm3_on_valid, instruction=args.instruction, seed=args.seed,
        epoch_items=args.epoch_items, retrieval_bank=args.retrieval_bank, retrieval_k=args.retrieval_k,
        retrieval_weight=args.retrieval_weight)

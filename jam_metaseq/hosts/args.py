"""The hosts' flags <-> our configs and options, shared by the fairseq and metaseq adapters.

The only place where host-style flags (``--decoder-embed-dim``, ``--cross-every``, ``--cm3-mode``
...) meet the typed configs of ``jam_metaseq.models.config`` (paper §2.1, §3.1) and the task's
``jam_metaseq.data.items.TaskOptions``. Host-free: argparse only.

Flags describe ONE PARENT (the shape both 7B parents share; JAM-Cross between parents of different
sizes: the LLM, with ``--img-*`` flags for the image branch's shape); the arch's family derives the model:
``jam_uniform`` = the parent's shape (Eq. 1), ``jam_width`` = ``width_of(parent)`` (Eq. 2-3),
``jam_cross`` = ``cross_of(parent, cross_every)`` (Eq. 4-5). Sized archs (``jam_cross_7b`` ...) fill
every flag the user did not give; the bare family name is the 7B size. Boolean flags default to
``None`` so that an arch can tell "not given" from "given".

The resulting config is stored on the args as ``args.jam_config`` (``cfg.to_dict()``): hosts pickle
their model args into every checkpoint (``cfg["model"]``), so a checkpoint carries its config.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from jam_metaseq.data.items import TaskOptions, parse_mixture
from jam_metaseq.inputs import NON_NEGATIVE_FLOAT, RATE
from jam_metaseq.models.config import (
    ARCH_CROSS, ARCH_UNIFORM, ARCH_WIDTH, CrossConfig, DecoderConfig, ModelConfig, config_from_dict,
    cross_of, preset, uniform_of, width_of,
)
from jam_metaseq.objectives.cm3 import CM3Config
from jam_metaseq.vocab import VocabManifest

TASK_NAME = "cm3_multimodal"
"""The task's name in both hosts' registries (``--task``)."""
CRITERION_NAME = "cm3"
"""The criterion's name in both hosts' registries (``--criterion``)."""

FAMILIES = (ARCH_UNIFORM, ARCH_WIDTH, ARCH_CROSS)
SIZES = {"tiny": "tiny", "1_3b": "opt_1_3b", "7b": "cm3leon_7b"}
"""Arch size suffix -> parent preset (``7b`` = the paper's CM3leon-shaped 7B parents)."""
DEFAULT_SIZE = "7b"


def arch_names() -> dict[str, tuple[str, str]]:
    """Every registered arch name -> (family, size): ``jam_cross`` and ``jam_cross_{tiny,1_3b,7b}``..."""
    out = {}
    for fam in FAMILIES:
        out[fam] = (fam, DEFAULT_SIZE)
        for size in SIZES:
            out[f"{fam}_{size}"] = (fam, size)
    return out


# Host flags of one parent, in the order checkpoints store them (``cfg["model"]``): (flag dest,
# DecoderConfig field, how the flag holds it). "value": the field's value; "negated": True when the
# field is False (metaseq's --disable-* switches); "echo": a copy metaseq's own models read that
# config_from_args never reads back.
_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("decoder_embed_dim", "embed_dim", "value"),
    ("decoder_ffn_embed_dim", "ffn_dim", "value"),
    ("decoder_layers", "layers", "value"),
    ("decoder_attention_heads", "heads", "value"),
    ("decoder_input_dim", "embed_dim", "echo"),
    ("decoder_output_dim", "embed_dim", "echo"),
    ("max_target_positions", "max_positions", "value"),
    ("tokens_per_sample", "max_positions", "echo"),
    ("activation_fn", "activation", "value"),
    ("dropout", "dropout", "value"),
    ("attention_dropout", "attention_dropout", "value"),
    ("disable_bias", "bias", "negated"),
    ("disable_affine_ln", "affine_ln", "negated"),
    ("no_scale_embedding", "scale_embedding", "negated"),
)
_SHAPE_FLAGS = {flag: fld for flag, fld, how in _FLAGS if how == "value"}
_NEG_FLAGS = {flag: fld for flag, fld, how in _FLAGS if how == "negated"}
ALWAYS_ON = ("decoder_learned_pos", "share_decoder_input_output_embed", "decoder_normalize_before")
"""Switches metaseq's ``model_parallel_transformer_lm`` reads that every JAM model has on
(learned positions, tied embeddings, pre-LayerNorm)."""


def add_model_args(parser: argparse.ArgumentParser | Any) -> None:
    """The JAM model flags (defaults None: the arch fills what is not given)."""
    a = parser.add_argument
    a("--decoder-embed-dim", type=int, metavar="E", help="hidden size of each parent (JAM-Width doubles it)")
    a("--decoder-ffn-embed-dim", type=int, metavar="F", help="FFN inner size of each parent")
    a("--decoder-layers", type=int, metavar="L", help="layers of each parent / branch")
    a("--decoder-attention-heads", type=int, metavar="H", help="attention heads of each parent")
    a("--max-target-positions", type=int, metavar="T", help="longest sequence (learned positions)")
    a("--activation-fn", choices=("relu", "gelu"), help="FFN activation")
    a("--dropout", type=RATE, metavar="P", help="residual/embedding dropout")
    a("--attention-dropout", type=RATE, metavar="P", help="attention-probability dropout")
    a("--disable-bias", action="store_true", default=None, help="no biases in projections (CM3leon)")
    a("--disable-affine-ln", action="store_true", default=None, help="LayerNorm without weight/bias (CM3leon)")
    a("--no-scale-embedding", action="store_true", default=None, help="do not scale embeddings by sqrt(E)")
    a("--decoder-learned-pos", action="store_true", default=None,
      help="learned positions (always on; accepted for metaseq compatibility)")
    a("--share-decoder-input-output-embed", action="store_true", default=None,
      help="tie input and output embeddings (always on; accepted for metaseq compatibility)")
    a("--cross-every", type=int, metavar="K",
      help="JAM-Cross: a cross-attention block pair after every K-th layer; 0 = none (Table 4)")
    a("--cross-init", choices=("paper", "preserve"),
      help="JAM-Cross: how new parameters start when the model is built from scratch")
    a("--img-embed-dim", type=int, metavar="E",
      help="JAM-Cross between parents of different sizes: hidden size of the image branch (default: the LLM's)")
    a("--img-ffn-embed-dim", type=int, metavar="F", help="JAM-Cross: FFN inner size of the image branch")
    a("--img-layers", type=int, metavar="L",
      help="JAM-Cross: layers of the image branch (cross pairs aligned by proportional depth)")
    a("--img-attention-heads", type=int, metavar="H", help="JAM-Cross: attention heads of the image branch")


def apply_arch_defaults(args: argparse.Namespace, *, family: str, size: str) -> None:
    """Fill every model flag left at None from the size's parent preset (in place)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown JAM family {family!r}; expected one of {FAMILIES}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    parent = preset(SIZES[size])
    for flag, fld in _SHAPE_FLAGS.items():
        if getattr(args, flag, None) is None:
            setattr(args, flag, getattr(parent, fld))
    for flag, fld in _NEG_FLAGS.items():
        if getattr(args, flag, None) is None:
            setattr(args, flag, not getattr(parent, fld))
    # metaseq's model_parallel_transformer_lm requires both; our models always have them.
    args.decoder_learned_pos = True
    args.share_decoder_input_output_embed = True
    if getattr(args, "cross_every", None) is None:
        args.cross_every = 2  # the paper's best (Table 4)
    if getattr(args, "cross_init", None) is None:
        args.cross_init = "paper"
    args.jam_family = family
    args.jam_size = size


def config_from_args(args: argparse.Namespace, *, vocab_size: int, padding_idx: int = 1,
                     image_range: tuple[int, int] = (-1, -1)) -> ModelConfig:
    """Build the model config from filled args (after ``apply_arch_defaults``).

    A stored ``args.jam_config`` (a checkpoint's own args) wins over the flags: it is what the
    weights were trained with.
    """
    stored = getattr(args, "jam_config", None)
    if stored:
        cfg = config_from_dict(dict(stored))
        if cfg.vocab_size != vocab_size:
            raise ValueError(f"the checkpoint's model has {cfg.vocab_size} embedding rows but the "
                             f"dictionary has {vocab_size} symbols")
        return cfg
    family = getattr(args, "jam_family", None)
    if family not in FAMILIES:
        raise ValueError(f"args carry no JAM family (got {family!r}); was the arch function applied?")
    if not getattr(args, "share_decoder_input_output_embed", True):
        raise ValueError("JAM models always tie input and output embeddings")
    missing = [f for f in list(_SHAPE_FLAGS) + list(_NEG_FLAGS) if getattr(args, f, None) is None]
    if missing:
        raise ValueError(f"model flags not set: {', '.join('--' + m.replace('_', '-') for m in missing)}")
    fields: dict[str, Any] = {fld: getattr(args, flag) for flag, fld in _SHAPE_FLAGS.items()}
    fields.update({fld: not bool(getattr(args, flag)) for flag, fld in _NEG_FLAGS.items()})
    parent = DecoderConfig(vocab_size=vocab_size, padding_idx=padding_idx, **fields)
    given = [flag for flag in IMG_FLAGS if getattr(args, flag, None) is not None]
    image = {IMG_FLAGS[flag]: getattr(args, flag) for flag in given}
    if image and family != ARCH_CROSS:
        raise ValueError(f"--{given[0].replace('_', '-')}: the image-branch shape flags (--img-*) are "
                         f"JAM-Cross flags; the arch is {family}")
    if family == ARCH_UNIFORM:
        return uniform_of(parent)
    if family == ARCH_WIDTH:
        return width_of(parent)
    return cross_of(parent, int(args.cross_every), cross_init=args.cross_init,
                    image_vocab_start=image_range[0], image_vocab_end=image_range[1],
                    image_parent=dataclasses.replace(parent, **image) if image else None)


CROSS_FLAGS = ("cross_every", "cross_init", "image_vocab_start", "image_vocab_end")
"""The JAM-Cross flags ``args_from_config`` adds after the parent's."""
IMG_FLAGS = {"img_embed_dim": "embed_dim", "img_ffn_embed_dim": "ffn_dim", "img_layers": "layers",
             "img_attention_heads": "heads"}
"""Asymmetric JAM-Cross: the image branch's shape flags (``config.SHAPE_FIELDS``; unset = the
LLM's), which ``args_from_config`` adds only for a model whose branches differ."""


def host_arch(cfg: ModelConfig) -> str:
    """The ``--arch`` family of ``cfg``: ``jam_cross`` / ``jam_width`` / ``jam_uniform``, or
    ``transformer_lm`` for a plain parent decoder."""
    if isinstance(cfg, CrossConfig):
        return ARCH_CROSS
    if not isinstance(cfg, DecoderConfig):
        raise TypeError(f"not a model config: {type(cfg).__name__}")
    # the module's own (interned) names, not the config's copy: pickled into checkpoints, equal
    # strings that are one object are stored once, so the object decides the file's bytes
    return next((fam for fam in FAMILIES if fam == cfg.arch), "transformer_lm")


def args_from_config(cfg: ModelConfig) -> dict[str, Any]:
    """Inverse of ``config_from_args``: every host flag (dest names) of ``cfg``, in the order
    checkpoints store them. The flags describe one parent (JAM-Width: half the widened dims);
    ``jam_family`` is the family that rebuilds ``cfg`` (a plain parent: ``jam_uniform``, whose
    model is the parent's)."""
    arch = host_arch(cfg)
    extra: dict[str, Any] = {}
    if isinstance(cfg, CrossConfig):
        parent = cfg.parent
        extra = {flag: getattr(cfg, flag) for flag in CROSS_FLAGS}
        if not cfg.symmetric:
            extra.update({flag: getattr(cfg.img, fld) for flag, fld in IMG_FLAGS.items()})
    elif arch == ARCH_WIDTH:  # the inverse of width_of
        parent = dataclasses.replace(cfg, embed_dim=cfg.embed_dim // 2, ffn_dim=cfg.ffn_dim // 2,
                                     heads=cfg.heads // 2)
    else:
        parent = cfg
    out: dict[str, Any] = {}
    for flag, fld, how in _FLAGS:
        out[flag] = not getattr(parent, fld) if how == "negated" else getattr(parent, fld)
    out.update({flag: True for flag in ALWAYS_ON})
    out["jam_family"] = arch if arch in FAMILIES else ARCH_UNIFORM
    out.update(extra)
    return out


def command_line_from_config(cfg: ModelConfig) -> list[str]:
    """The model flags of a training command that rebuilds ``cfg`` (``args_from_config`` as
    ``--flag value`` words): only the flags ``add_model_args`` defines, so the echoes a checkpoint
    stores for metaseq's own models (``decoder_input_dim``, ``tokens_per_sample`` ...), the
    switches metaseq needs and ``jam_family`` (the arch says it) are left out."""
    parser = argparse.ArgumentParser(add_help=False)
    add_model_args(parser)
    accepted = set(vars(parser.parse_args([])))
    words: list[str] = []
    for dest, value in args_from_config(cfg).items():
        if dest not in accepted:
            continue
        flag = "--" + dest.replace("_", "-")
        if isinstance(value, bool):
            words += [flag] if value else []
        else:
            words += [flag, str(value)]
    return words


# ---- the cm3_multimodal task and the cm3 criterion ------------------------------------------------
def add_task_args(parser: Any) -> None:
    """The cm3_multimodal task flags."""
    a = parser.add_argument
    a("data", help="data directory: DATA/{split}/{source}.json binarized sources (+ optional vocab.json)")
    a("--tokens-per-sample", type=int, default=2048, help="model input length (default %(default)s)")
    a("--mixture", default=None,
      help="training source weights NAME=W,NAME=W (token-balanced; default: all sources equally)")
    a("--cm3-mode", default="poisson", choices=("poisson", "fixed", "fim"), help="CM3 span-count rule")
    a("--cm3-lambda", type=NON_NEGATIVE_FLOAT, default=1.0, help="Poisson rate of the number of CM3 spans")
    a("--cm3-min-spans", type=int, default=0, help="lower clamp of the span count (0 allows plain LM)")
    a("--cm3-max-spans", type=int, default=None, help="upper clamp (default: the vocabulary's sentinels)")
    a("--cm3-cross-documents", action="store_true", help="let spans cross <eos> inside a packed block")
    a("--cm3-on-valid", action="store_true", help="CM3-transform validation items too")
    a("--instruction", action="store_true",
      help="instruction mode: loss only on tokens the data's loss mask keeps (responses)")
    a("--epoch-items", type=int, default=0, help="training items per epoch (0 = all blocks)")
    a("--retrieval-bank", default=None,
      help="memory bank (jam-retrieval build) whose documents are prefixed to items; a source's blocks "
           "get neighbours from DATA/{split}/{source}.neighbours.npy (jam-retrieval neighbours BANK "
           "--dataset DATA/{split}/{source}); sources without one get no prefix")
    a("--retrieval-k", type=int, default=2, help="retrieved documents per item at most (default %(default)s)")
    a("--retrieval-weight", type=NON_NEGATIVE_FLOAT, default=0.0,
      help="loss weight of retrieved prefix tokens (RA-CM3 used 0.1; default %(default)s)")


def add_criterion_args(parser: Any) -> None:
    """The cm3 criterion flags."""
    parser.add_argument("--sentinel-weight", type=NON_NEGATIVE_FLOAT, default=1.0,
                        help="loss weight of predicting CM3 sentinels (CM3 used 0; default %(default)s)")


def saved_cfg_groups(*, seed: int = 1) -> dict[str, Any]:
    """The ``cfg`` groups besides ``model`` that a host's evaluation CLI (``metaseq-validate`` /
    ``fairseq-validate --path``) rebuilds the task and criterion from, for checkpoints written
    outside a trainer (``jam-ckpt``): ``task`` and ``criterion`` Namespaces holding every
    ``cm3_multimodal`` / ``cm3`` flag at its default (the hosts set DATA and the flags given on the
    command line over them), and an ``optimization`` group like a trainer's (no updates yet)."""
    p = argparse.ArgumentParser(add_help=False)
    add_task_args(p)
    add_criterion_args(p)
    flags = vars(p.parse_args([""]))  # DATA: the evaluation CLI's positional argument replaces it
    names = {"task": TASK_NAME, "criterion": CRITERION_NAME, "seed": seed}
    return {
        "task": argparse.Namespace(**names, **flags, _name=TASK_NAME),
        "criterion": argparse.Namespace(**names, **flags, _name=CRITERION_NAME),
        "optimization": {"_name": None, "max_epoch": 0, "max_update": 0, "clip_norm": 0.0,
                         "update_freq": [1], "lr": [0.0]},
    }


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

"""The parents of an operation: opened, their configs read, and every check that can fail on
shapes and layouts run before the first byte is written (the tensors each parent must hold, what
two parents may differ in, one dtype); the vocabulary an output stores.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from checkpoints_tools.ops.options import CommonOptions
from checkpoints_tools.readers import Reader, open_checkpoint
from checkpoints_tools.readers.vocab_rows import extend_rows
from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.models.config import (
    BRANCH_FIELDS, FUNCTION_FIELDS, SHAPE_FIELDS, TENSOR_FIELDS, CrossConfig, DecoderConfig, ModelConfig,
)
from jam_metaseq.vocab import VocabManifest, find_vocab

_INIT_FNS: set[Any] | None = None


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Parameter init as a no-op while a model is built on the meta device: random fills of meta
    tensors go through torch's Python refs, whose first use imports ``torch._dynamo`` (~2 s of a
    jam-ckpt run); the shapes do not depend on them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _INIT_FNS:
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


@functools.lru_cache(maxsize=32)
def _shapes(cfg_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    global _INIT_FNS
    from jam_metaseq.models import build_model, config_from_json

    if _INIT_FNS is None:
        _INIT_FNS = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.random_}
        _INIT_FNS |= {getattr(torch.nn.init, n) for n in dir(torch.nn.init)
                      if n.endswith("_") and not n.startswith("_")}
    with torch.device("meta"), _SkipInit():
        model = build_model(config_from_json(cfg_json))
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict(keep_vars=True).items())


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Ordered {state-dict key: shape} of the model ``cfg`` (= ``jam_metaseq.fusion.state_shapes``,
    built on the meta device without parameter init; cached by config)."""
    from jam_metaseq.models import config_to_json

    return dict(_shapes(config_to_json(cfg)))


def check_parent_tensors(reader: Reader, cfg: DecoderConfig, *, role: str) -> None:
    """The parent holds exactly the tensors (names, shapes) of a decoder shaped ``cfg``."""
    want = expected_shapes(cfg)
    have = reader.shapes()
    where = reader.files[0] if reader.files else reader.path
    for n, s in want.items():
        if n not in have:
            raise CheckpointError(f"{where}: {role} parent has no tensor {n}")
        if tuple(have[n]) != tuple(s):
            raise CheckpointError(f"{where}: {role} parent tensor {n} has shape {tuple(have[n])}, expected {tuple(s)}")
    extra = [n for n in have if n not in want]
    if extra:
        raise CheckpointError(f"{where}: {role} parent has unexpected tensor(s) {extra[:3]}")


def _instead(fld: str, *, shapes_may_differ: bool) -> str:
    """What to do when two parents differ in ``fld``: the fusion that takes them, or why none does."""
    if fld in SHAPE_FIELDS and not shapes_may_differ:
        return "; parents of different sizes fuse with JAM-Cross (jam-ckpt cross), whose branches keep their shapes"
    if fld in BRANCH_FIELDS and not shapes_may_differ:
        return ("; parents of different families (blocks) fuse with JAM-Cross (jam-ckpt cross), whose branches keep "
                "their own blocks")
    if fld == "vocab_size":
        return ("; give both parents one vocabulary: a manifest whose ids.extends adds the smaller embedding's missing "
                "rows (--vocab; docs/FAMILIES.md)")
    if fld == "padding_idx":
        return "; name one pad id for both (--vocab MANIFEST)"
    if shapes_may_differ:
        return f"; JAM-Cross parents share it (both branches compute with the LLM's {fld}), as every JAM fusion's do"
    return (f"; no JAM fusion takes parents that differ in {fld} (JAM-Uniform and JAM-Width mix their weights, "
            "JAM-Cross's branches compute with one model's settings)")


def check_same_parents(readers: Sequence[Reader], cfgs: Sequence[DecoderConfig], roles: Sequence[str], *,
                       shapes_may_differ: bool = False) -> None:
    """Parents must agree in ``SHAPE_FIELDS`` (width, FFN, depth, heads), ``TENSOR_FIELDS``
    (vocab, positions, biases, norm kind), ``FUNCTION_FIELDS`` (activation, norm, rotary settings,
    embedding scale, padding) and every tensor shape; with ``shapes_may_differ`` (asymmetric
    JAM-Cross, whose branches also keep their own blocks: ``BRANCH_FIELDS``) in ``TENSOR_FIELDS`` and
    ``FUNCTION_FIELDS`` only (each parent's tensors are then
    checked against its own config). Each refusal names the field and the fusion that would take
    the parents, if any."""
    a = cfgs[0]
    for r, c, role in zip(readers[1:], cfgs[1:], roles[1:]):
        differ = [f for f in (*SHAPE_FIELDS, *TENSOR_FIELDS, *FUNCTION_FIELDS)
                  if getattr(c, f) != getattr(a, f) and not (shapes_may_differ and f in (*SHAPE_FIELDS, *BRANCH_FIELDS))]
        if differ:  # the one to name: a difference no fusion takes first, then the vocabulary, then block and size
            fld = min(differ, key=lambda f: (f in SHAPE_FIELDS or f in BRANCH_FIELDS, f in ("vocab_size", "padding_idx"),
                                             f in SHAPE_FIELDS))
            raise CheckpointError(
                f"{r.files[0] if r.files else r.path}: {role} parent has {fld}={getattr(c, fld)!r}, "
                f"{roles[0]} parent ({readers[0].path}) has {getattr(a, fld)!r}"
                f"{_instead(fld, shapes_may_differ=shapes_may_differ)}")
        if shapes_may_differ:
            continue
        sa, sb = readers[0].shapes(), r.shapes()
        for n in sa:
            if n not in sb:
                raise CheckpointError(f"{r.path}: {role} parent has no tensor {n} ({roles[0]} parent has it)")
            if tuple(sa[n]) != tuple(sb[n]):
                raise CheckpointError(f"{r.path}: {role} parent tensor {n} has shape {tuple(sb[n])}, "
                                      f"{roles[0]} parent has {tuple(sa[n])}")
        for n in sb:
            if n not in sa:
                raise CheckpointError(f"{r.path}: {role} parent has extra tensor {n}")


def common_dtype(readers: Sequence[Reader], dtype: torch.dtype | None) -> torch.dtype:
    """The output dtype: ``dtype`` if given, else the parents' one dtype (mixed = error)."""
    dts = [r.param_dtype for r in readers]  # raises on mixed dtypes inside one checkpoint
    if dtype is not None:
        return dtype
    if len(set(dts)) > 1:
        desc = ", ".join(f"{r.path}: {d}" for r, d in zip(readers, dts))
        raise CheckpointError(f"parents have different dtypes ({desc}); choose one with --dtype")
    return dts[0]


def input_paths(readers: Sequence[Reader]) -> list[Path]:
    """Every path the readers read (files and the paths they were opened by): the output
    must not be or contain one of them."""
    return [p for r in readers for p in (r.path, *r.files)]


def config_overrides(vocab: VocabManifest | None, heads: int | None) -> dict[str, Any]:
    """What ``Reader.config`` is told besides the checkpoint: the heads (``--heads``) and the
    padding id of the vocabulary in use (an HF Llama names none)."""
    out: dict[str, Any] = {"heads": heads} if heads else {}
    if vocab is not None:
        out["padding_idx"] = vocab.pad
    return out


def open_parents(paths: Sequence[str | os.PathLike], roles: Sequence[str], *, opts: CommonOptions,
                 heads: int | None, role_heads: Mapping[str, int | None] | None = None,
                 shapes_may_differ: bool = False) -> tuple[list[Reader], list[DecoderConfig]]:
    """The parents (``roles``: how messages name them) opened and checked: plain decoders
    (``heads``, or ``role_heads[role]``, where a checkpoint does not record them) that agree
    (``check_same_parents``) and hold exactly their config's tensors. The vocabulary in use
    (``--vocab``, else the first parent's own) gives the padding id and the rows it adds."""
    raw = [open_checkpoint(p, trust_pickle=opts.trust_pickle, replica_mismatch=opts.replica_mismatch)
           for p in paths]
    vocab = parents_vocab(opts.vocab, raw)
    readers = [extend_rows(r, vocab) for r in raw]
    cfgs = []
    for r, role in zip(readers, roles):
        own = (role_heads or {}).get(role)
        h = own or heads
        over = config_overrides(vocab, h)
        if own:  # a disagreement names the flag the user gave (--img-heads), check_config
            over["heads_flag"] = "--img-heads"
        c = r.config(**over)
        if isinstance(c, CrossConfig):
            raise CheckpointError(f"{r.path}: {role} parent is a JAM-Cross model; parents must be decoders")
        cfgs.append(c)
    check_same_parents(readers, cfgs, roles, shapes_may_differ=shapes_may_differ)
    for r, c, role in zip(readers, cfgs, roles):
        check_parent_tensors(r, c, role=role)
    return readers, cfgs


def parents_vocab(given: str | os.PathLike | None, readers: Sequence[Reader]) -> VocabManifest | None:
    """The vocabulary of an operation: ``given`` (``--vocab``), else the first parent's own
    (``Reader.vocab``: stored in it, or a ``vocab.json`` beside it); None if there is none."""
    if given is not None:
        return find_vocab(given=given)
    return next((v for v in (r.vocab() for r in readers) if v is not None), None)


def output_vocab(given: str | os.PathLike | None, *, cfg: ModelConfig,
                 sources: Sequence[Reader] = ()) -> dict[str, Any] | None:
    """The vocabulary manifest an output stores (``parents_vocab``); a given one must fit the
    output's embedding."""
    v = parents_vocab(given, sources)
    if v is not None and given is not None:
        try:
            v.check_embedding(cfg.vocab_size, what="output model")
        except ValueError as e:
            raise CheckpointError(f"{given}: {e}") from None
    return None if v is None else v.to_dict()

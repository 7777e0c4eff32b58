"""JAM-Cross (paper §2.1.3, ``jam-ckpt cross``): both parents as branches, with cross-attention
blocks every ``cross_every`` layers, streamed through ``kernels.cross_into``
(``jam_metaseq.fusion.cross``'s plan). The parents may differ in ``SHAPE_FIELDS`` (asymmetric
JAM-Cross, ``CrossConfig.image_parent``) and in their blocks (``BRANCH_FIELDS``). Parents whose
vocabularies have different text tokenizers (a Llama LLM beside a Chameleon image parent) are
brought to one token stream first: the LLM transplanted into the image parent's vocabulary
(``ops.transplant``, said on stderr), in a temporary directory beside the output.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path

import torch

from checkpoints_tools import kernels
from checkpoints_tools.io.output_dir import OutputDir, OutputSpec
from checkpoints_tools.ops import stream
from checkpoints_tools.ops.options import CommonOptions, manifest_extra
from checkpoints_tools.ops.parents import (
    common_dtype, expected_shapes, input_paths, open_parents, output_vocab, parents_vocab,
)
from checkpoints_tools.ops.provenance import source_record
from checkpoints_tools.ops.stream import ReadAhead, float_dtypes, skipped_tied
from checkpoints_tools.readers import Reader
from checkpoints_tools.safe_load import CheckpointError
from checkpoints_tools.workspace import Workspace
from jam_metaseq.fusion.cross import DEFAULT_INIT_SEED_SCHEME, INIT_SEED_SCHEMES, cross_plan
from jam_metaseq.models.config import BRANCH_FIELDS, SHAPE_FIELDS, cross_of


def cross(llm: str | os.PathLike, img: str | os.PathLike, *, opts: CommonOptions, cross_every: int = 2,
          init: str = "paper", seed: int = 0, image_vocab: tuple[int, int] | None = None,
          heads: int | None = None, init_seed_scheme: str = DEFAULT_INIT_SEED_SCHEME,
          img_heads: int | None = None) -> Path:
    """JAM-Cross (§2.1.3): both parents as branches, cross blocks every ``cross_every`` layers.
    ``init_seed_scheme``: how the normal init of new weights is seeded (``jam_metaseq.fusion.cross``:
    ``per-block`` draws in parallel; ``per-tensor`` reproduces outputs written before the scheme
    was recorded); recorded in the manifest's parameters.

    The parents may differ in width, FFN, depth and heads (asymmetric JAM-Cross,
    ``CrossConfig.image_parent``) and in their block type (``BRANCH_FIELDS``: a Chameleon image
    parent's q/k norms beside a Llama LLM): the image branch takes the image parent's, everything
    else (``TENSOR_FIELDS``: vocabulary, positions, biases, LayerNorm kind; ``FUNCTION_FIELDS``:
    activation, embedding scale, LayerNorm eps, padding) is the LLM's and must agree. ``img_heads``: the image parent's heads when its checkpoint does not
    record them (default ``heads``)."""
    if init_seed_scheme not in INIT_SEED_SCHEMES:
        raise CheckpointError(f"init seed scheme must be one of {INIT_SEED_SCHEMES}, got {init_seed_scheme!r}")
    tmp = _transplanted_llm(llm, img, opts=opts, heads=heads)
    try:
        if tmp is not None:
            opts = dataclasses.replace(opts, vocab=str(tmp / "vocab.json"))
        return _cross(tmp or llm, img, opts=opts, cross_every=cross_every, init=init, seed=seed,
                      image_vocab=image_vocab, heads=heads, init_seed_scheme=init_seed_scheme, img_heads=img_heads,
                      transplanted=tmp is not None)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _transplanted_llm(llm: str | os.PathLike, img: str | os.PathLike, *, opts: CommonOptions,
                      heads: int | None) -> Path | None:
    """The LLM moved into the image parent's vocabulary when their vocabulary manifests name
    different text tokenizers (written beside the output, removed after the cross), else None."""
    from checkpoints_tools.ops.transplant import transplant
    from checkpoints_tools.readers import open_checkpoint

    rl, ri = (open_checkpoint(p, trust_pickle=opts.trust_pickle) for p in (llm, img))
    vl, vi = rl.vocab(), (ri.vocab(opts.vocab) if opts.vocab else ri.vocab())
    if vl is None or vi is None or vl.text_tokenizer == vi.text_tokenizer or not vi.text_tokenizer:
        return None
    try:  # two spellings of one tokenizer (a relative and an absolute path) are one tokenizer
        from jam_metaseq.data.tokenizers import load_text_tokenizer

        if load_text_tokenizer(vl.text_tokenizer).token_bytes() == load_text_tokenizer(vi.text_tokenizer).token_bytes():
            return None
    except (OSError, ValueError) as e:
        print(f"cross: the parents' manifests name different text tokenizers ({vl.text_tokenizer} vs "
              f"{vi.text_tokenizer}) but one does not load ({e}); fusing without a transplant", file=sys.stderr)
        return None
    out = opts.spec.out_dir
    tmp = out.parent / f".{out.name}.transplant-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"cross: the parents' text tokenizers differ ({vl.text_tokenizer} vs {vi.text_tokenizer}): the LLM is "
          "transplanted into the image parent's vocabulary first (jam-ckpt transplant --to-vocab)", file=sys.stderr)
    spec = OutputSpec(out_dir=tmp, dtype=opts.spec.dtype, overwrite=True)
    t_opts = dataclasses.replace(opts, spec=spec, vocab=None, hash_sources="none", progress=opts.progress)
    transplant(llm, to_tokenizer=vi.text_tokenizer, opts=t_opts, heads=heads, to_vocab=vi)
    vi.save(tmp / "vocab.json")
    return tmp


def _cross(llm: str | os.PathLike, img: str | os.PathLike, *, opts: CommonOptions, cross_every: int, init: str,
           seed: int, image_vocab: tuple[int, int] | None, heads: int | None, init_seed_scheme: str,
           img_heads: int | None, transplanted: bool) -> Path:
    readers, cfgs = open_parents([llm, img], ["llm", "img"], opts=opts, heads=heads, role_heads={"img": img_heads},
                                 shapes_may_differ=True)
    parent = cfgs[0]
    image_parent = dataclasses.replace(parent, **{f: getattr(cfgs[1], f) for f in (*SHAPE_FIELDS, *BRANCH_FIELDS)})
    if image_vocab is None:
        v = parents_vocab(opts.vocab, readers)
        image_vocab = None if v is None else (v.image_start, v.image_end)
    if image_vocab is None:
        raise CheckpointError("cross needs the image-code range: pass --vocab MANIFEST or --image-vocab START END")
    lo, hi = image_vocab
    if not 0 <= lo < hi <= parent.vocab_size:
        raise CheckpointError(f"image vocab range [{lo}, {hi}) does not fit the {parent.vocab_size}-row embedding")
    cfg = cross_of(parent, cross_every, cross_init=init, image_vocab_start=lo, image_vocab_end=hi,
                   image_parent=image_parent)
    shapes = expected_shapes(cfg)
    dtype = common_dtype(readers, opts.spec.dtype)
    vocab = output_vocab(opts.vocab, cfg=cfg, sources=readers)
    out = OutputDir(dataclasses.replace(opts.spec, dtype=dtype), cfg=cfg, shapes=shapes, vocab=vocab,
                    inputs=input_paths(readers))
    a, b = readers
    ws = Workspace()

    def cross_sources(name: str) -> list[tuple[Reader, str]]:
        return [({"llm": a, "img": b}[p.role], p.source) for p in cross_plan(name, cfg) if p.kind == "copy"]

    ahead = ReadAhead([n for n in shapes if n not in skipped_tied(out, True)], cross_sources)

    def produce(name: str, buf: torch.Tensor) -> torch.Tensor:
        # The output projection is the embedding by construction: written as its alias (tied=True).
        ahead.advance(name)
        return kernels.cross_into(name, buf, cfg=cfg, llm=a, img=b, seed=seed, ws=ws, scheme=init_seed_scheme)

    sources = [source_record(role, r, hash_sources=opts.hash_sources) for role, r in zip(("llm", "img"), readers)]
    asym = {} if cfg.symmetric else {"cross_pairs": [list(p) for p in cfg.cross_pairs]}
    return stream.stream_to(out, produce, produced_dtypes=float_dtypes(shapes, torch.float32), desc="cross",
                            progress=opts.progress, threads=opts.threads,
                            manifest_extra=manifest_extra(opts, "cross", sources, cross_every=cross_every, init=init,
                                                          seed=seed, init_seed_scheme=init_seed_scheme,
                                                          image_vocab=[lo, hi], **asym,
                                                          **({"llm_transplanted": True} if transplanted else {})),
                            tied=cfg.shared_embedding)

"""JAM-Width (paper Eq. 2/3, ``jam-ckpt widen``): a decoder of width 2E initialised block-wise from
both parents, streamed through ``kernels.widen_into`` (``jam_metaseq.fusion.width``'s rules).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from checkpoints_tools import kernels
from checkpoints_tools.io.output_dir import OutputDir
from checkpoints_tools.ops import stream
from checkpoints_tools.ops.options import CommonOptions, manifest_extra
from checkpoints_tools.ops.parents import common_dtype, expected_shapes, input_paths, open_parents, output_vocab
from checkpoints_tools.ops.provenance import source_record
from checkpoints_tools.ops.stream import ReadAhead, float_dtypes, skipped_tied, upcoming_sizes
from checkpoints_tools.workspace import Workspace
from jam_metaseq.models.config import width_of
from jam_metaseq.models.keys import TIED


def widen(llm: str | os.PathLike, img: str | os.PathLike, *, opts: CommonOptions, init: str = "copy",
          heads: int | None = None) -> Path:
    """JAM-Width (Eq. 2/3): a decoder of width 2E initialised block-wise from both parents."""
    readers, cfgs = open_parents([llm, img], ["llm", "img"], opts=opts, heads=heads)
    parent = cfgs[0]
    cfg = width_of(parent)
    shapes = expected_shapes(cfg)
    dtype = common_dtype(readers, opts.spec.dtype)
    vocab = output_vocab(opts.vocab, cfg=cfg, sources=readers)
    out = OutputDir(dataclasses.replace(opts.spec, dtype=dtype), cfg=cfg, shapes=shapes, vocab=vocab,
                    inputs=input_paths(readers))
    a, b = readers
    ws = Workspace()
    tied = a.tied(*TIED) and b.tied(*TIED)
    up_a, up_b = (upcoming_sizes(shapes, r, skip=skipped_tied(out, tied)) for r in readers)

    ahead = ReadAhead([n for n in shapes if n not in skipped_tied(out, tied)], lambda n: [(a, n), (b, n)])

    def produce(name: str, buf: torch.Tensor) -> torch.Tensor:
        ahead.advance(name)
        ta = a.get_into(name, ws.get("in0", a.info(name).shape, a.info(name).dtype, upcoming=up_a[name]))
        tb = b.get_into(name, ws.get("in1", b.info(name).shape, b.info(name).dtype, upcoming=up_b[name]))
        return kernels.widen_into(name, ta, tb, buf, parent=parent, init=init)

    sources = [source_record(role, r, hash_sources=opts.hash_sources) for role, r in zip(("llm", "img"), readers)]
    return stream.stream_to(out, produce, produced_dtypes=float_dtypes(shapes, torch.float32), desc="widen",
                            progress=opts.progress, threads=opts.threads,
                            manifest_extra=manifest_extra(opts, "widen", sources, init=init), tied=tied)

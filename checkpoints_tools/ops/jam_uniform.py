"""JAM-Uniform (paper Eq. 1, ``jam-ckpt merge``): the weighted average of n parents of one shape,
streamed tensor by tensor through ``kernels.merge_into`` (``jam_metaseq.fusion.uniform``'s math).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import torch

from checkpoints_tools import kernels
from checkpoints_tools.io.output_dir import OutputDir
from checkpoints_tools.ops import stream
from checkpoints_tools.ops.options import CommonOptions, manifest_extra
from checkpoints_tools.ops.parents import common_dtype, expected_shapes, input_paths, open_parents, output_vocab
from checkpoints_tools.ops.provenance import source_record
from checkpoints_tools.ops.stream import ReadAhead, float_dtypes, skipped_tied, upcoming_sizes
from checkpoints_tools.safe_load import CheckpointError
from checkpoints_tools.workspace import Workspace
from jam_metaseq.models.config import uniform_of
from jam_metaseq.models.keys import TIED


def merge(parents: Sequence[str | os.PathLike], *, opts: CommonOptions,
          weights: Sequence[float] | None = None, heads: int | None = None) -> Path:
    """JAM-Uniform (Eq. 1), n-way: theta = sum_i w_i theta_i (default w_i = 1/n)."""
    if len(parents) < 2:
        raise CheckpointError("merge needs at least two parents")
    if weights is not None:
        if len(weights) != len(parents):
            raise CheckpointError(f"{len(parents)} parents but {len(weights)} weights")
    else:
        weights = [1.0 / len(parents)] * len(parents)
    roles = [f"#{i}" for i in range(len(parents))]
    readers, cfgs = open_parents(parents, roles, opts=opts, heads=heads)
    cfg = uniform_of(cfgs[0])
    shapes = expected_shapes(cfg)
    dtype = common_dtype(readers, opts.spec.dtype)
    vocab = output_vocab(opts.vocab, cfg=cfg, sources=readers)
    out = OutputDir(dataclasses.replace(opts.spec, dtype=dtype), cfg=cfg, shapes=shapes, vocab=vocab,
                    inputs=input_paths(readers))

    ws = Workspace()
    tied = all(r.tied(*TIED) for r in readers)
    ups = [upcoming_sizes(shapes, r, skip=skipped_tied(out, tied)) for r in readers]

    ahead = ReadAhead([n for n in shapes if n not in skipped_tied(out, tied)], lambda n: [(r, n) for r in readers])

    def produce(name: str, buf: torch.Tensor) -> torch.Tensor:
        ahead.advance(name)
        ins = [r.get_into(name, ws.get(f"in{i}", r.info(name).shape, r.info(name).dtype, upcoming=ups[i][name]))
               for i, r in enumerate(readers)]
        return kernels.merge_into(name, ins, buf, weights=weights)

    sources = [source_record(role, r, hash_sources=opts.hash_sources) for role, r in zip(roles, readers)]
    return stream.stream_to(out, produce, produced_dtypes=float_dtypes(shapes, torch.float32), desc="merge",
                            progress=opts.progress, threads=opts.threads,
                            manifest_extra=manifest_extra(opts, "merge", sources, weights=list(weights)), tied=tied)

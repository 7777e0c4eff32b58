"""Reshard and convert (``jam-ckpt reshard``, ``jam-ckpt convert``): any layout a reader opens ->
any layout a writer writes (MP N -> M, FSDP shards in or out, consolidated <-> sharded, ``.pt`` <->
safetensors, HF <-> metaseq), tensor by tensor, bit for bit.
"""

from __future__ import annotations

import os
from pathlib import Path

from checkpoints_tools.io.output_dir import OutputDir
from checkpoints_tools.ops import stream
from checkpoints_tools.ops.options import CommonOptions, manifest_extra
from checkpoints_tools.ops.parents import config_overrides, input_paths, output_vocab, parents_vocab
from checkpoints_tools.ops.provenance import source_record
from checkpoints_tools.readers import open_checkpoint
from checkpoints_tools.readers.vocab_rows import extend_rows
from jam_metaseq.models.keys import TIED


def reshard(src: str | os.PathLike, *, opts: CommonOptions, heads: int | None = None) -> Path:
    """Any layout -> any layout (MP N->M, FSDP in/out, consolidated <-> sharded, .pt <-> safetensors)."""
    r = open_checkpoint(src, trust_pickle=opts.trust_pickle, replica_mismatch=opts.replica_mismatch)
    given = parents_vocab(opts.vocab, [r])
    r = extend_rows(r, given)
    cfg = r.config(**config_overrides(given, heads))
    shapes = r.shapes()
    dtype_in = r.param_dtype
    vocab = output_vocab(opts.vocab, cfg=cfg, sources=[r])
    out = OutputDir(opts.spec, cfg=cfg, shapes=shapes, vocab=vocab, inputs=input_paths([r]))
    produced = {n: r.info(n).dtype for n in shapes}
    extra = manifest_extra(opts, "reshard", [source_record("source", r, hash_sources=opts.hash_sources)],
                           source_dtype=str(dtype_in))
    return stream.stream_to(out, r.get_into,
                            produced_dtypes=produced, desc="reshard", progress=opts.progress, threads=opts.threads,
                            manifest_extra=extra,
                            tied=r.tied(*TIED))

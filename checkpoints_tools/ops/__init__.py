"""Streaming checkpoint operations (paper §2.1.1-2.1.3): one file per operation, over shared parts.

- ``jam_uniform.py`` ``merge`` (JAM-Uniform, Eq. 1), ``jam_width.py`` ``widen`` (JAM-Width,
  Eq. 2/3), ``jam_cross.py`` ``cross`` (JAM-Cross), ``relayout.py`` ``reshard`` (any layout -> any
  layout; ``jam-ckpt convert`` too), ``transplant.py`` ``transplant`` (another text tokenizer),
  ``extend_vocab.py`` ``extend_vocab`` (the rows a grown vocabulary adds, ``jam-ckpt extend-vocab``).
- ``stream.py``: the driver every operation hands its ``produce(name, buffer)`` to: tensors in
  order, reads and math of tensor k+1 overlapping the writes of tensor k, atomic commit.
- ``parents.py``: opening the parents and every check that can fail before a byte is written;
  the vocabulary an output stores. ``provenance.py``: the sources' hashes in the manifest.
  ``options.py``: ``CommonOptions``.

The fusion math is ``jam_metaseq.fusion`` (applied in chunks by ``checkpoints_tools.kernels``);
this package feeds it one tensor at a time from lazy readers and hands each result to an
``OutputDir``, so memory stays at a few tensors whatever the model size. Any error or interrupt
removes the temp output.
"""

from checkpoints_tools.ops.extend_vocab import extend_vocab
from checkpoints_tools.ops.jam_cross import cross
from checkpoints_tools.ops.jam_uniform import merge
from checkpoints_tools.ops.jam_width import widen
from checkpoints_tools.ops.options import CommonOptions
from checkpoints_tools.ops.parents import expected_shapes
from checkpoints_tools.ops.provenance import HASH_SOURCES, SourceHash, source_record
from checkpoints_tools.ops.relayout import reshard
from checkpoints_tools.ops.stream import ReadAhead, stream_to
from checkpoints_tools.ops.transplant import transplant

__all__ = ["HASH_SOURCES", "CommonOptions", "ReadAhead", "SourceHash", "cross", "expected_shapes", "extend_vocab",
           "merge", "reshard", "source_record", "stream_to", "transplant", "widen"]

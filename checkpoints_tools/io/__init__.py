"""Writing checkpoints: bytes on disk, durable, hashed and atomic (paper §2.1's outputs).

Tensors arrive one at a time and go straight to disk, so a 26B model is never held in memory:

- ``hashed_file.py``: output files sha256-hashed as written (beside the write, on a helper
  thread), in 1 MiB writes through a write-behind window, fsynced; ``sha256_file``.
- ``zip_crc.py``: the CRC-32s of a torch zip file, filled in beside the write (byte for byte what
  torch writes); ``torch_zip.py``: one ``.pt`` file streamed record by record, pickle last.
- ``safetensors.py``: the safetensors format (dtype names, header validation, index files) and
  its streamed writer.
- ``fsdp.py``: FSDP shard files (fairscale's flat parameters and ``shard_metadata``);
  ``host_meta.py``: what metaseq/fairseq need in a ``.pt`` besides the weights (``cfg["model"]``,
  neutral optimizer history) -- the one place the writers use the host flag table.
- ``target.py``: where an output may go, owned temp directories, the atomic rename into place;
  ``output_dir.py``: ``OutputDir``, one model written atomically in any layout (MP parts, FSDP
  shards, safetensors, HF), ``manifest.json`` last.
"""

from checkpoints_tools.io.errors import OutputError, OutputWriteError
from checkpoints_tools.io.hashed_file import sha256_file
from checkpoints_tools.io.output_dir import OutputDir, OutputSpec

__all__ = ["OutputDir", "OutputError", "OutputSpec", "OutputWriteError", "sha256_file"]

"""Lazy checkpoint readers: every supported format seen as one consolidated (MP=1) state dict with
metaseq key names, one tensor at a time.

``open_checkpoint(path)`` asks each entry of ``FORMATS`` in turn whether it reads ``path`` and opens
it with the first that does; ``VIEWS`` then see a state dict with another family's names (an HF
model saved as a plain ``.safetensors`` or ``.bin``) through that family's key map. The room:

- ``base.py``: ``Reader`` (``get_into`` reads one consolidated tensor straight into a buffer),
  ``TensorInfo`` and the checks every format makes; ``infer.py``: the model config a checkpoint
  stores, or one inferred from its shapes and host args.
- one file per format: ``metaseq.py`` (``.pt``: consolidated or model-parallel parts, joined as
  read; ``pt_files.py`` groups the files, ``fsdp.py`` indexes FSDP shards), ``safetensors.py``,
  ``hf.py`` (HF directories of any family in ``jam_metaseq.models.hf_families``), ``gguf.py``
  (llama.cpp's GGUF files of the llama architecture, dequantized on read).

Adding a format is one file here (its ``Reader``, ``claims(path)`` and an ``open`` function) and one
entry in ``FORMATS``. Nothing in a file is trusted: headers, zip records and pickles are
validated, and every error names the file and the tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from checkpoints_tools.readers import gguf, hf, metaseq, safetensors
from checkpoints_tools.readers.base import (
    REPLICA_MISMATCH, Reader, ReplicaMismatchWarning, TensorInfo, check_parameter_dtype,
)
from checkpoints_tools.readers.hf import HFReader, MultiReader
from checkpoints_tools.readers.infer import arch_of, infer_config, resolve_config
from checkpoints_tools.readers.metaseq import MetaseqReader
from checkpoints_tools.readers.safetensors import SafetensorsReader
from checkpoints_tools.io.safetensors import read_safetensors_header, read_safetensors_index
from checkpoints_tools.safe_load import CheckpointError


@dataclass(frozen=True)
class Format:
    """One checkpoint format: ``claims(path)`` tells from names and file types alone (reading
    nothing) whether ``path`` is one; ``open(path, *, trust_pickle, replica_mismatch)`` reads it."""

    name: str
    claims: Callable[[Path], bool]
    open: Callable[..., Reader]
    views: bool = True
    """False: the reader gives metaseq names itself, so ``VIEWS`` are not asked (a GGUF file's)."""


FORMATS: tuple[Format, ...] = (
    Format("hf", hf.claims, hf.open_hf_dir),
    Format("safetensors", safetensors.claims, safetensors.open_safetensors),
    Format("gguf", gguf.claims, gguf.open_gguf, views=False),
    Format("metaseq", metaseq.claims, metaseq.open_pt),
)
"""Asked in this order; the first that claims a path opens it (``metaseq`` claims any file path)."""

VIEWS: tuple[Callable[[Reader, Path], Reader], ...] = (hf.view,)
"""Applied to every opened reader in turn: each returns it, or a view of it with metaseq names."""


def open_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False,
                    replica_mismatch: str = "error") -> Reader:
    """Open any supported checkpoint lazily (``FORMATS``); HF names come back as metaseq's
    (``VIEWS``). ``replica_mismatch``: see ``REPLICA_MISMATCH`` (model-parallel parts whose
    replicated tensors differ)."""
    path = Path(path)
    fmt = next((f for f in FORMATS if f.claims(path)), None)
    if fmt is None:
        raise CheckpointError(f"{path}: no .pt or .safetensors checkpoint in this directory")
    reader = fmt.open(path, trust_pickle=trust_pickle, replica_mismatch=replica_mismatch)
    for view in VIEWS if fmt.views else ():
        reader = view(reader, path)
    return reader


__all__ = [
    "FORMATS", "REPLICA_MISMATCH", "VIEWS", "CheckpointError", "Format", "HFReader", "MetaseqReader", "MultiReader",
    "Reader", "ReplicaMismatchWarning", "SafetensorsReader", "TensorInfo", "arch_of", "check_parameter_dtype",
    "infer_config", "open_checkpoint", "read_safetensors_header", "read_safetensors_index", "resolve_config",
]

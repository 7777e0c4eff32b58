"""checkpoints_tools: read, merge, widen, cross-initialise and reshard JAM parent checkpoints (paper §2.1).

Public API: ``load_model`` (any checkpoint -> core model), ``open_checkpoint`` (lazy consolidated
view of any layout), the operations in ``ops`` and the ``jam-ckpt`` CLI (``cli.main``).

Rooms, lowest first (imports point down): ``safe_load`` (the one pickle reader, mapped files),
``layout`` (model-parallel split / join by the key schema), ``workspace`` (reused buffers),
``kernels`` (the fusion math in chunks), ``hf`` (HF family adapters: key maps and configs);
``io`` (writing: hashed durable files, torch-zip and safetensors streaming, FSDP shards, host
metadata, the atomic output directory); ``readers`` (one file per format, config inference);
``ops`` (one file per operation, the streaming driver, parent checks, provenance) and ``load``
(``load_model``, ``inspect``, ``verify``); ``cli``.
"""

from checkpoints_tools.load import inspect_checkpoint, load_model, verify_checkpoint
from checkpoints_tools.readers import open_checkpoint
from checkpoints_tools.safe_load import CheckpointError, UnsafePickleError

__all__ = ["CheckpointError", "UnsafePickleError", "inspect_checkpoint", "load_model", "open_checkpoint",
           "verify_checkpoint"]

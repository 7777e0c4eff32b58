"""checkpoints_tools: read, merge, widen, cross-initialise and reshard JAM parent checkpoints (paper §2.1).

Public API: ``load_model`` (any checkpoint -> core model), ``open_checkpoint`` (lazy consolidated
view of any layout), the operations in ``ops`` and the ``jam-ckpt`` CLI (``cli.main``).
"""

from checkpoints_tools.load import inspect_checkpoint, load_model, verify_checkpoint
from checkpoints_tools.readers import open_checkpoint
from checkpoints_tools.safe_load import CheckpointError, UnsafePickleError

__all__ = ["CheckpointError", "UnsafePickleError", "inspect_checkpoint", "load_model", "open_checkpoint",
           "verify_checkpoint"]

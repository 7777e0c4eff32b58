"""The options every writing operation takes (``CommonOptions``: the output, the vocabulary, source
hashing, progress, pickle trust, threads) and the operation's record in the manifest.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from checkpoints_tools.io.output_dir import OutputSpec


@dataclasses.dataclass
class CommonOptions:
    """Options shared by every writing operation."""

    spec: OutputSpec
    """Where and how the output is written."""
    vocab: str | None = None
    """Vocab manifest JSON stored as vocab.json (checked against the embedding; default: the first
    parent's own, ``parents.parents_vocab``)."""
    hash_sources: bool | str = "auto"
    """Source sha256s in the manifest: ``auto`` | ``full`` | ``none`` (see ``HASH_SOURCES``;
    True = auto, False = none). Hashing reads the sources once more, on a helper thread."""
    progress: bool = True
    """A progress bar on stderr."""
    command: Sequence[str] | None = None
    """The command line, recorded in the manifest."""
    trust_pickle: bool = False
    """Read the sources' pickles without the allow-list (``--trust-pickle``)."""
    replica_mismatch: str = "error"
    """Model-parallel parts whose replicated tensors differ: ``error`` or ``warn`` (use part 0's;
    ``readers.REPLICA_MISMATCH``)."""
    threads: int | None = 1
    """torch intra-op threads while streaming (see ``stream_to``; None = torch's setting)."""


def manifest_extra(opts: CommonOptions, op: str, sources: list[Any], **params: Any) -> dict[str, Any]:
    """What an operation adds to its output's ``manifest.json``: the operation, its parameters, its
    sources (``provenance.SourceHash`` records, resolved when the stream ends) and the command."""
    return {"operation": op, "parameters": params, "sources": sources,
            "command": list(opts.command) if opts.command else None}

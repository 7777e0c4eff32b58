"""Retrieval augmentation (paper §3.1): CLIP memory bank, faiss MIPS, retrieved-document prefixes.

- ``encoders``: open_clip document/query vectors (text and image parts averaged), query dropout.
- ``bank``: the memory bank on disk (vectors, ids, token sequences; resumable build).
- ``index``: faiss exact (flat) and approximate (ivf, hnsw) inner-product indexes.
- ``retriever``: top-k MIPS with the diversity rules; by text/image, vector or bank row.
- ``prefix``: retrieved documents as a prefix of a training sequence or prompt.
- ``cli``: ``jam-retrieval build | index | query | neighbours | info``.

Names are imported lazily so that ``prefix`` users need neither torch, open_clip nor faiss.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_retrieval_prefix": "prefix", "prepend_retrieved": "prefix", "safe_cut": "prefix",
    "IndexConfig": "index", "build_index": "index", "load_index": "index", "save_index": "index",
    "MemoryBank": "bank", "BankBuildConfig": "bank", "build_memory_bank": "bank",
    "write_memory_bank": "bank", "read_documents": "bank",
    "ClipDocumentEncoder": "encoders", "ClipEncoderConfig": "encoders", "QueryParts": "encoders",
    "query_dropout_keep": "encoders",
    "Retriever": "retriever", "RetrieverConfig": "retriever", "RetrievedDoc": "retriever",
    "select_diverse": "retriever", "retrieval_prefix_for_prompt": "retriever",
    "load_neighbours": "retriever", "neighbour_docs": "retriever", "RetrievalAugmenter": "retriever",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

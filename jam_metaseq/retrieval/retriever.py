"""Dense retriever with diversity rules and query dropout (paper §3.1 "Retrieval Augmentation").

Given a query q (a training document or a prompt: text and/or image), the relevance score of a
bank document m is r(q, m) = <E(q), E(m)> with E the CLIP document encoder (encoders.py); top
candidates come from maximum inner product search over the bank's faiss index. Selection, in
score order, skips a candidate
- whose score passes the threshold: by default score > 0.9, "too similar to the query" (CM3leon's
  rule, which JAM follows); ``threshold_rule="skip_at_or_below"`` gives the JAM paper's literal
  sentence (skip score <= 0.9) instead; ``score_threshold=None`` turns it off;
- that is the query itself (by bank row) or has the query's token content (content hash);
- that duplicates a document already chosen: same content hash, or cosine with it above
  ``duplicate_cosine``;
and stops at k documents (default 2). During training, query dropout removes 20% of the query's
tokens before encoding (``encoders.query_dropout_keep``).

Training on binarized data queries by bank row: bank row i is document i of the JSONL files the
bank was built from (same files, same order as the binarized dataset); ``retrieve_by_row`` uses
the row's dropout-encoded vector (``query_vectors.npy``) when training and the bank has it, and
``precompute_neighbours`` retrieves for every row at once (``jam-retrieval neighbours``).
``jam-retrieval neighbours BANK --dataset PREFIX`` then maps those per-document neighbours onto
the dataset's blocks, ``<prefix>.neighbours.npy``, which the ``cm3_multimodal`` task reads
(``block_neighbours``, ``align_datasets``, ``write_block_neighbours``, ``load_block_neighbours``:
the rule is stated above ``block_neighbours``).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jam_metaseq.inputs import check_float, read_json
from jam_metaseq.retrieval.bank import MemoryBank, content_hash
from jam_metaseq.retrieval.index import search
from jam_metaseq.retrieval.prefix import build_retrieval_prefix
from jam_metaseq.vocab import VocabManifest


@dataclass
class RetrieverConfig:
    """How retrieved documents are selected."""

    k: int = 2
    """Documents returned per query."""
    score_threshold: float | None = 0.9
    """Relevance threshold of the diversity rule; None = no threshold."""
    threshold_rule: Literal["skip_above", "skip_at_or_below"] = "skip_above"
    """``skip_above``: CM3leon (skip score > threshold); ``skip_at_or_below``: JAM's literal text."""
    duplicate_cosine: float | None = 0.9
    """A candidate whose cosine with an already chosen document exceeds this is a duplicate."""
    query_dropout: float = 0.2
    """Fraction of query tokens dropped when ``training``."""
    candidates: int = 16
    """Candidates fetched by the first search (at least 4k); doubled until k survive."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.threshold_rule not in ("skip_above", "skip_at_or_below"):
            raise ValueError(f"threshold_rule {self.threshold_rule!r} not in "
                             "('skip_above', 'skip_at_or_below')")
        if not 0.0 <= self.query_dropout < 1.0:
            raise ValueError(f"query_dropout must be in [0, 1), got {self.query_dropout}")
        for name in ("score_threshold", "duplicate_cosine"):  # None = off; NaN would pass every comparison
            if getattr(self, name) is not None:
                check_float(getattr(self, name), name=name)
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")


@dataclass
class RetrievedDoc:
    """One retrieved document: its id, bank row, relevance score and token ids."""

    doc_id: str
    score: float
    tokens: np.ndarray
    row: int


def passes_threshold(score: float, *, config: RetrieverConfig) -> bool:
    t = config.score_threshold
    if t is None:
        return True
    return score <= t if config.threshold_rule == "skip_above" else score > t


def select_diverse(
    *, scores: np.ndarray, rows: np.ndarray, k: int, config: RetrieverConfig, hashes: np.ndarray,
    vectors: np.ndarray, exclude_rows: Iterable[int] = (), exclude_hashes: Iterable[int] = (),
) -> list[tuple[int, float]]:
    """Walk candidates (best first) applying the diversity rules; at most ``k`` ``(row, score)``.

    ``scores``/``rows``: one query's search result (C,), rows -1 = empty slot; ``hashes`` (N,) and
    ``vectors`` (N, D): the bank's content hashes and document vectors.
    """
    skip_rows = {int(r) for r in exclude_rows}
    seen_hashes = {int(h) for h in exclude_hashes}
    chosen: list[tuple[int, float]] = []
    chosen_vecs: list[np.ndarray] = []
    for score, row in zip(np.asarray(scores).tolist(), np.asarray(rows).tolist()):
        if len(chosen) == k:
            break
        if row < 0 or row in skip_rows or not passes_threshold(score, config=config):
            continue
        h = int(hashes[row])
        if h in seen_hashes:
            continue
        v = np.asarray(vectors[row], dtype=np.float32)
        if config.duplicate_cosine is not None and any(
                float(v @ c) > config.duplicate_cosine for c in chosen_vecs):
            continue
        chosen.append((row, float(score)))
        chosen_vecs.append(v)
        seen_hashes.add(h)
        skip_rows.add(row)
    return chosen


class Retriever:
    """Top-k MIPS over a memory bank with the diversity rules; optional CLIP encoder for queries."""

    def __init__(self, *, bank: MemoryBank, config: RetrieverConfig | None = None, index=None,
                 encoder=None) -> None:
        self.bank = bank
        self.config = config or RetrieverConfig()
        self.index = index if index is not None else bank.load_index()
        self.encoder = encoder
        if self.index.ntotal != len(bank):
            raise ValueError(f"index holds {self.index.ntotal} vectors, bank {bank.path} {len(bank)}")
        if encoder is not None and getattr(encoder, "dim", bank.dim) != bank.dim:
            raise ValueError(f"encoder dim {encoder.dim} != bank dim {bank.dim}")

    @classmethod
    def from_bank_dir(cls, path: str | Path, *, config: RetrieverConfig | None = None,
                      with_encoder: bool = True, clip_checkpoint: str | None = None,
                      device: str = "cpu", index_overrides: dict[str, Any] | None = None,
                      trust_pickle: bool = False) -> "Retriever":
        """Load a bank, its index and (optionally) the CLIP encoder recorded in its manifest.

        ``clip_checkpoint`` replaces the recorded weights path (a bank moved between machines);
        ``trust_pickle`` lets its loader unpickle globals outside the allow-list.
        """
        bank = MemoryBank.load(path)
        encoder = None
        if with_encoder:
            from jam_metaseq.retrieval.encoders import ClipDocumentEncoder, ClipEncoderConfig

            rec = dict(bank.manifest["encoder"])
            if rec.get("type") != "open_clip":
                raise ValueError(f"{bank.path}: bank vectors were not made by an open_clip encoder")
            enc_cfg = ClipEncoderConfig(
                model_name=rec["model_name"], checkpoint=clip_checkpoint or rec.get("checkpoint"),
                device=device, renormalize=rec.get("renormalize", True),
                precision=rec.get("precision", "fp32"), init_seed=rec.get("init_seed", 0),
                trust_pickle=trust_pickle)
            encoder = ClipDocumentEncoder(config=enc_cfg)
        return cls(bank=bank, config=config, index=bank.load_index(overrides=index_overrides),
                   encoder=encoder)

    # ---- by vector -------------------------------------------------------------------------
    def _first_candidates(self, k: int, n_exclude: int) -> int:
        return min(max(self.config.candidates, 4 * k + n_exclude), self.index.ntotal)

    def _select_expanding(self, query: np.ndarray, *, k: int, exclude_rows: Sequence[int],
                          exclude_hashes: Sequence[int], first: tuple[np.ndarray, np.ndarray] | None = None
                          ) -> list[tuple[int, float]]:
        c = self._first_candidates(k, len(exclude_rows))
        while True:
            if first is not None and first[0].size >= c:
                scores, rows = first
            else:
                s, r = search(self.index, query[None, :], k=c)
                scores, rows = s[0], r[0]
            chosen = select_diverse(scores=scores, rows=rows, k=k, config=self.config,
                                    hashes=self.bank.hashes, vectors=self.bank.vectors,
                                    exclude_rows=exclude_rows, exclude_hashes=exclude_hashes)
            if len(chosen) == k or c >= self.index.ntotal:
                return chosen
            c = min(2 * c, self.index.ntotal)

    def _docs(self, chosen: list[tuple[int, float]]) -> list[RetrievedDoc]:
        return [RetrievedDoc(doc_id=self.bank.doc_ids[r], score=s, tokens=self.bank.tokens(r), row=r)
                for r, s in chosen]

    def retrieve_by_vector(self, vector: np.ndarray, *, k: int | None = None,
                           exclude_rows: Sequence[int] = (), exclude_hashes: Sequence[int] = ()
                           ) -> list[RetrievedDoc]:
        """Up to k diverse documents for a query vector (D,) (fewer only if the bank runs out)."""
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        if q.size != self.bank.dim:
            raise ValueError(f"query vector has {q.size} dims, bank {self.bank.dim}")
        return self._docs(self._select_expanding(q, k=k or self.config.k, exclude_rows=exclude_rows,
                                                 exclude_hashes=exclude_hashes))

    def retrieve_by_row(self, row: int, *, k: int | None = None, training: bool = False
                        ) -> list[RetrievedDoc]:
        """Neighbours of bank document ``row``, never itself or a copy of its tokens.

        With ``training`` and a bank built with query vectors, the query is the row's
        dropout-encoded vector; otherwise its document vector.
        """
        if not 0 <= row < len(self.bank):
            raise IndexError(f"bank row {row} out of range [0, {len(self.bank)})")
        vecs = self.bank.query_vectors if training and self.bank.query_vectors is not None else self.bank.vectors
        return self.retrieve_by_vector(vecs[row], k=k, exclude_rows=[row],
                                       exclude_hashes=[int(self.bank.hashes[row])])

    def retrieve_by_id(self, doc_id: str, *, k: int | None = None, training: bool = False
                       ) -> list[RetrievedDoc]:
        return self.retrieve_by_row(self.bank.row_of(doc_id), k=k, training=training)

    # ---- by text / image -------------------------------------------------------------------
    def encode_query(self, query_text: str | None = None, query_image: Any = None, *,
                     training: bool, rng: np.random.Generator | None = None) -> np.ndarray:
        """The query's document vector (D,), with query dropout when ``training``."""
        from jam_metaseq.retrieval.encoders import QueryParts

        if self.encoder is None:
            raise ValueError("this retriever has no encoder: query by vector or bank row instead")
        parts = QueryParts(text=query_text, images=[query_image] if query_image is not None else [])
        if parts.is_empty():
            raise ValueError("a query needs text or an image")
        rate = self.config.query_dropout if training else 0.0
        if rate > 0 and rng is None:
            raise ValueError("training retrieval (query dropout) needs an rng")
        return self.encoder.encode_documents([parts], drop_rate=rate, rng=rng)[0]

    def retrieve(self, query_text: str | None = None, query_image: Any = None, *, k: int | None = None,
                 training: bool, rng: np.random.Generator | None = None,
                 query_tokens: np.ndarray | None = None) -> list[RetrievedDoc]:
        """Up to k diverse documents for a text and/or PIL image query.

        ``query_tokens``: the query document's token ids when known, so that copies of it in the
        bank are skipped too.
        """
        q = self.encode_query(query_text, query_image, training=training, rng=rng)
        excl = [content_hash(query_tokens)] if query_tokens is not None else []
        return self.retrieve_by_vector(q, k=k, exclude_hashes=excl)

    # ---- whole bank ------------------------------------------------------------------------
    def precompute_neighbours(self, *, k: int | None = None, training: bool = False,
                              batch_size: int = 1024, progress: bool = True
                              ) -> tuple[np.ndarray, np.ndarray]:
        """``retrieve_by_row`` for every row: ``(rows (N, k) int64, scores (N, k) float32)``, -1/nan pad."""
        k = k or self.config.k
        n = len(self.bank)
        vecs = self.bank.query_vectors if training and self.bank.query_vectors is not None else self.bank.vectors
        out_rows = np.full((n, k), -1, np.int64)
        out_scores = np.full((n, k), np.nan, np.float32)
        c = self._first_candidates(k, 1)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n, desc="neighbours", unit="doc", file=sys.stderr)
        for s in range(0, n, batch_size):
            block = np.asarray(vecs[s:s + batch_size], dtype=np.float32)
            scores, rows = search(self.index, block, k=c)
            for j in range(block.shape[0]):
                row = s + j
                chosen = self._select_expanding(block[j], k=k, exclude_rows=[row],
                                                exclude_hashes=[int(self.bank.hashes[row])],
                                                first=(scores[j], rows[j]))
                for m, (r, sc) in enumerate(chosen):
                    out_rows[row, m], out_scores[row, m] = r, sc
            if bar is not None:
                bar.update(block.shape[0])
        if bar is not None:
            bar.close()
        return out_rows, out_scores


def retrieval_prefix_for_prompt(retriever: Retriever, *, prompt_text: str, vocab: VocabManifest,
                                max_len: int, k: int | None = None) -> tuple[np.ndarray, list[RetrievedDoc]]:
    """What ``jam-generate --retrieve`` puts before a prompt: ``(prefix ids, retrieved docs)``.

    Inference retrieval: no query dropout; the prefix layout and truncation are ``prefix.py``'s.
    """
    docs = retriever.retrieve(prompt_text, None, k=k, training=False)
    return build_retrieval_prefix([d.tokens for d in docs], vocab=vocab, max_len=max_len), docs


def save_neighbours(bank: MemoryBank, *, rows: np.ndarray, scores: np.ndarray, config: RetrieverConfig,
                    training: bool) -> None:
    """Store ``precompute_neighbours``' result in the bank (``neighbours.npy``, atomic) and record it."""
    import json
    import os

    for name, arr in (("neighbours", rows), ("neighbour_scores", scores)):
        tmp = bank.path / f"{name}.tmp.npy"
        np.save(tmp, arr)
        os.replace(tmp, bank.path / f"{name}.npy")
    bank.manifest["neighbours"] = {"file": "neighbours.npy", "scores": "neighbour_scores.npy",
                                   "k": int(rows.shape[1]), "training": bool(training),
                                   "config": dataclasses.asdict(config)}
    tmp = bank.path / "manifest.json.tmp"
    tmp.write_text(json.dumps(bank.manifest, indent=2) + "\n")
    os.replace(tmp, bank.path / "manifest.json")


def load_neighbours(bank: MemoryBank) -> tuple[np.ndarray, np.ndarray]:
    """``(rows (N, k) int64, scores (N, k) float32)`` written by ``jam-retrieval neighbours``."""
    rec = bank.manifest.get("neighbours")
    if rec is None:
        raise FileNotFoundError(f"{bank.path}: no precomputed neighbours (run `jam-retrieval neighbours`)")
    return np.load(bank.path / rec["file"]), np.load(bank.path / rec["scores"])


def neighbour_docs(bank: MemoryBank, neighbours: np.ndarray, row: int) -> list[np.ndarray]:
    """Token arrays of bank document ``row``'s precomputed neighbours, best first (-1 slots skipped)."""
    return [bank.tokens(int(r)) for r in neighbours[row] if r >= 0]


class RetrievalAugmenter:
    """What the ``cm3_multimodal`` task calls per training document: retrieve, then prefix.

    ``augment(sequence, row=i)`` -> ``(tokens, is_prefix)``: document i's retrieved neighbours
    (precomputed ``neighbours.npy`` when the bank has them, else a live ``retrieve_by_row`` with
    the training query vectors) laid out by ``prefix.prepend_retrieved`` within ``context`` tokens.
    Row i must be document i of the binarized dataset (same JSONL files, same order).
    """

    def __init__(self, *, bank_dir: str | Path, vocab: VocabManifest, context: int,
                 config: RetrieverConfig | None = None, use_precomputed: bool = True,
                 training: bool = True) -> None:
        bank = MemoryBank.load(bank_dir)
        bank_vocab = bank.vocab
        if bank_vocab is not None and bank_vocab != vocab:
            raise ValueError(f"{bank.path}: bank vocab manifest has {bank_vocab.size} ids, the model's "
                             f"{vocab.size} (or their layouts differ): rebuild the bank with this vocab")
        self.bank, self.vocab, self.context, self.training = bank, vocab, int(context), training
        self.config = config or RetrieverConfig()
        self.neighbours: np.ndarray | None = None
        if use_precomputed and "neighbours" in bank.manifest:
            self.neighbours = load_neighbours(bank)[0]
        self._retriever: Retriever | None = None  # built lazily: faiss only when needed

    def docs_for(self, row: int) -> list[np.ndarray]:
        if self.neighbours is not None:
            return neighbour_docs(self.bank, self.neighbours, row)[: self.config.k]
        if self._retriever is None:
            self._retriever = Retriever(bank=self.bank, config=self.config)
        return [d.tokens for d in self._retriever.retrieve_by_row(row, training=self.training)]

    def augment(self, sequence: np.ndarray, *, row: int) -> tuple[np.ndarray, np.ndarray]:
        from jam_metaseq.retrieval.prefix import prepend_retrieved

        return prepend_retrieved(sequence, self.docs_for(row), vocab=self.vocab, context=self.context)


# ---- training data: neighbours per block of a binarized dataset ---------------------------------
# The cm3_multimodal task (hosts/common.py) reads ``<prefix>.neighbours.npy``: (B, k) int64 bank rows
# per *block* of the binarized dataset at ``<prefix>`` (-1 = none), while ``precompute_neighbours``
# retrieves per bank *row*, i.e. per document. The mapping, written by
# ``jam-retrieval neighbours BANK --dataset PREFIX [--dataset PREFIX2 ...]``:
# - alignment: the datasets, in the order given, hold the bank's documents in order: document j of
#   the d-th dataset is bank row ``row_offset_d + j`` (row_offset_d = documents of the datasets
#   before it), and the documents over all datasets must number exactly len(bank). Checked: the
#   counts, the vocabularies, and the token content (bank content hash) of up to
#   ``check_documents`` documents spread evenly over each dataset (all of them on request);
# - per block: the documents a block overlaps (one for ``--break-mode eos``; several for
#   ``complete``), their neighbour lists merged round-robin by rank (rank 1 of each document in
#   document order, then rank 2, ...), skipping -1, repeats and the block's own documents; the
#   first k kept. A block holding one document gets exactly that document's neighbours.
# - ``<prefix>.neighbours.info`` records what the file was made from (bank size, row offset, blocks),
#   so the task can refuse a stale file (re-binarized data, rebuilt bank). It holds JSON but is not
#   named *.json: the task takes every DATA/{split}/*.json for a binarized source's index.
NEIGHBOURS_SUFFIX = ".neighbours.npy"
NEIGHBOURS_META_SUFFIX = ".neighbours.info"
LEGACY_SUFFIXES = (".neighbors.npy", ".neighbors.info")
"""The same files as written before the project settled on one spelling; still read."""


def block_neighbours(doc_rows: np.ndarray, *, doc_offsets: np.ndarray, block_offsets: np.ndarray,
                     row_offset: int = 0, k: int | None = None) -> np.ndarray:
    """Per-block bank rows (B, k) int64 from per-document neighbours ``doc_rows`` (D, k0), -1 = none.

    ``doc_offsets`` (D + 1,) and ``block_offsets`` (B + 1,) are the dataset's token offsets
    (``TokenBlockDataset.doc_offsets``/``.block_offsets``); document j is bank row ``row_offset + j``.
    """
    doc_rows = np.asarray(doc_rows, dtype=np.int64)
    doc_offsets = np.asarray(doc_offsets, dtype=np.int64)
    block_offsets = np.asarray(block_offsets, dtype=np.int64)
    n_docs = doc_offsets.size - 1
    if doc_rows.ndim != 2 or doc_rows.shape[0] != n_docs:
        raise ValueError(f"neighbours have shape {doc_rows.shape}, want ({n_docs}, k): one row per document")
    k = int(k or doc_rows.shape[1])
    n_blocks = block_offsets.size - 1
    out = np.full((n_blocks, k), -1, np.int64)
    if n_blocks == 0 or n_docs == 0:
        return out
    starts, ends = block_offsets[:-1], block_offsets[1:]
    first = np.searchsorted(doc_offsets, starts, side="right") - 1  # (B,) document holding the start
    last = np.searchsorted(doc_offsets, ends, side="left") - 1  # (B,) document holding the last token
    single = first == last
    width = min(k, doc_rows.shape[1])
    out[single, :width] = doc_rows[first[single], :width]
    for b in np.flatnonzero(~single).tolist():  # blocks of several documents (complete / none modes)
        own = set(range(row_offset + int(first[b]), row_offset + int(last[b]) + 1))
        chosen: list[int] = []
        for rank in range(doc_rows.shape[1]):
            for j in range(int(first[b]), int(last[b]) + 1):
                r = int(doc_rows[j, rank])
                if r >= 0 and r not in own and r not in chosen:
                    chosen.append(r)
                if len(chosen) == k:
                    break
            if len(chosen) == k:
                break
        out[b, :len(chosen)] = chosen
    return out


def align_datasets(bank: MemoryBank, prefixes: Sequence[str], *, check_documents: int | None = 256
                   ) -> list[tuple[Any, int]]:
    """Open the binarized datasets and check that, in order, they hold the bank's documents.

    Returns ``[(TokenBlockDataset, row_offset), ...]`` (empty for no prefixes). ``check_documents``: documents per dataset
    whose tokens are compared with the bank's (evenly spread; None = all). Raises ValueError naming
    the dataset and document that do not match.
    """
    from jam_metaseq.data.binarize import open_dataset

    out: list[tuple[Any, int]] = []
    if not prefixes:
        return out
    offset = 0
    bank_vocab = bank.vocab
    for prefix in prefixes:
        ds = open_dataset(prefix)
        if bank_vocab is not None and ds.vocab.to_dict() != bank_vocab.to_dict():
            raise ValueError(f"{prefix}: binarized with a vocabulary of {ds.vocab.size} ids, the bank "
                             f"{bank.path} with {bank_vocab.size} (or their layouts differ)")
        out.append((ds, offset))
        offset += ds.num_documents
    if offset != len(bank):
        sizes = ", ".join(f"{p}: {ds.num_documents}" for p, (ds, _) in zip(prefixes, out))
        raise ValueError(f"the datasets hold {offset} documents ({sizes}) but the bank {bank.path} has "
                         f"{len(bank)} rows: build the bank from the same JSONL files, in the same order, "
                         "and give every dataset made from them")
    for prefix, (ds, row_offset) in zip(prefixes, out):
        n = ds.num_documents
        if check_documents is None or check_documents >= n:
            docs = np.arange(n)
        else:
            docs = np.unique(np.linspace(0, n - 1, max(1, check_documents)).round().astype(np.int64))
        for j in docs.tolist():
            row = row_offset + j
            if content_hash(ds.document(j)["tokens"]) != int(bank.hashes[row]):
                raise ValueError(f"{prefix}: document {j} holds other tokens than bank row {row} "
                                 f"({bank.doc_ids[row]}): the bank must be built from the dataset's JSONL "
                                 "files, in the same order, with the same tokenizers")
    return out


def write_block_neighbours(ds: Any, *, rows: np.ndarray, row_offset: int, bank: MemoryBank,
                           training: bool, k: int | None = None) -> dict[str, Any]:
    """Write ``<prefix>.neighbours.npy`` (B, k) and ``<prefix>.neighbours.info`` for one dataset.

    ``rows``: the bank's per-row neighbours (N, k0) (``precompute_neighbours``); the dataset's
    slice ``rows[row_offset:row_offset + D]`` is mapped to blocks by ``block_neighbours``.
    """
    import json
    import os

    doc_rows = np.asarray(rows)[row_offset:row_offset + ds.num_documents]
    per_block = block_neighbours(doc_rows, doc_offsets=ds.doc_offsets, block_offsets=ds.block_offsets,
                                 row_offset=row_offset, k=k)
    meta = {"bank": str(Path(bank.path).resolve()), "bank_count": len(bank), "row_offset": int(row_offset),
            "num_documents": int(ds.num_documents), "num_blocks": len(ds), "block_size": ds.block_size,
            "break_mode": ds.break_mode, "k": int(per_block.shape[1]), "training": bool(training),
            "empty_blocks": int((per_block[:, 0] < 0).sum()) if per_block.size else len(ds)}
    path = Path(ds.prefix + NEIGHBOURS_SUFFIX)
    tmp = path.with_name(path.name[: -len(".npy")] + f".tmp{os.getpid()}.npy")
    np.save(tmp, per_block)
    os.replace(tmp, path)
    mpath = Path(ds.prefix + NEIGHBOURS_META_SUFFIX)
    mtmp = mpath.with_name(mpath.name + f".tmp{os.getpid()}")
    mtmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(mtmp, mpath)
    return {"dataset": ds.prefix, "file": str(path), **meta}


def load_block_neighbours(prefix: str, *, num_blocks: int, bank_size: int, mmap: bool = True
                          ) -> np.ndarray | None:
    """``<prefix>.neighbours.npy`` checked against the dataset and bank in use; None if absent.

    Raises ValueError (naming the file) when the file does not fit: wrong shape or dtype, rows
    outside the bank, or a ``.neighbours.info`` made for another bank size or block layout.
    """
    path, meta_path = Path(prefix + NEIGHBOURS_SUFFIX), Path(prefix + NEIGHBOURS_META_SUFFIX)
    if not path.is_file():
        path, meta_path = (Path(prefix + s) for s in LEGACY_SUFFIXES)
        if not path.is_file():
            return None
    redo = f"rerun `jam-retrieval neighbours BANK --dataset {prefix}`"
    nb = np.load(path, mmap_mode="r" if mmap else None)
    if nb.ndim != 2 or nb.shape[0] != num_blocks or nb.shape[1] < 1 or not np.issubdtype(nb.dtype, np.integer):
        raise ValueError(f"{path}: shape {nb.shape} dtype {nb.dtype}, but the dataset has {num_blocks} "
                         f"blocks (want ({num_blocks}, k) integer bank rows per block): {redo}")
    if meta_path.is_file():
        meta = read_json(meta_path, what="neighbours info")
        if int(meta.get("bank_count", bank_size)) != bank_size:
            raise ValueError(f"{meta_path}: made for a bank of {meta['bank_count']} rows, the bank in use "
                             f"has {bank_size}: {redo}")
        if int(meta.get("num_blocks", num_blocks)) != num_blocks:
            raise ValueError(f"{meta_path}: made for {meta['num_blocks']} blocks, the dataset has "
                             f"{num_blocks}: {redo}")
    if nb.size and int(np.max(nb)) >= bank_size:
        raise ValueError(f"{path}: bank row {int(np.max(nb))} out of range: the bank has {bank_size} rows: {redo}")
    return nb

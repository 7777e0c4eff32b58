"""The retrieval memory bank M: document vectors, ids and token sequences (paper §3.1).

A bank is a directory:
  manifest.json       kind, version, count N, dim D, encoder, sources, vocab, index config
  vectors.npy         (N, D) float32 L2-normalised document vectors (memory-mapped on load)
  query_vectors.npy   optional (N, D): the same documents encoded with query dropout, so that
                      training on binarized data can query with a dropped-out vector
  tokens.npy          int32 flat token ids of all documents (what gets prefixed)
  offsets.npy         (N + 1,) int64; document i is tokens[offsets[i]:offsets[i + 1]]
  hashes.npy          (N,) uint64 content hash of each token sequence (duplicate detection)
  doc_ids.json        N document ids (the JSONL line's "id", else "<file>:<line>")
  index.faiss         faiss index over vectors.npy (row i = document i)
  neighbours.npy      optional (N, k) int64 precomputed retrievals (-1 = none), see retriever.py

Building is resumable: documents are encoded in shards of ``shard_size`` written atomically under
``shards/`` with a ``build_state.json``; a rerun with the same inputs and encoder skips finished
shards. Consolidation then writes the files above and removes the shards.

Input documents are the data pipeline's JSONL lines (``jam_metaseq.data.documents``): a list of
segments ``{"text": str}``, ``{"image": "path.png"}`` (relative to the JSONL file) or
``{"image_tokens": [codes]}``, or an object with ``segments`` (or ``prompt`` + ``response``) and an
optional ``id``. Bank row i is the i-th non-blank line over the input files, in order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jam_metaseq.inputs import INT64_MAX, InputError, check_int_list, load_rgb_image, read_json
from jam_metaseq.retrieval.encoders import QueryParts
from jam_metaseq.retrieval.index import IndexConfig, build_index, load_index, save_index
from jam_metaseq.vocab import VocabManifest

BANK_KIND = "jam_retrieval_bank"
BANK_VERSION = 1
STATE_FILE = "build_state.json"


# ---- input documents --------------------------------------------------------------------------
@dataclass
class SourceDocument:
    """One JSONL document: its id, parsed JSON, segments, the folder its image paths are relative to."""

    doc_id: str
    doc: Any
    """The parsed JSON line (what ``jam_metaseq.data.documents.tokenize_document`` takes)."""
    segments: list[dict[str, Any]]
    """Prompt and response / document segments, in order (what gets CLIP-encoded)."""
    base_dir: Path
    where: str
    """``file:line`` for error messages."""


def parse_document_line(line: str | bytes, *, where: str, base_dir: Path) -> SourceDocument:
    """Parse one JSONL line in the data pipeline's shapes (list, ``segments``, prompt/response)."""
    from jam_metaseq.data.documents import DocumentError, parse_jsonl_line
    from jam_metaseq.data.documents import document_parts as split_document

    try:
        obj = parse_jsonl_line(line)
        prompt, segments = split_document(obj)
    except DocumentError as e:
        raise ValueError(f"{where}: {e.detail}") from None
    segments = list(prompt or []) + list(segments)
    if not segments:
        raise ValueError(f"{where}: document has no segments")
    for j, seg in enumerate(segments):
        if not isinstance(seg, dict) or len(set(seg) & {"text", "image", "image_tokens"}) != 1:
            raise ValueError(
                f"{where}: segment {j} must have exactly one of 'text', 'image', 'image_tokens'")
    doc_id = str(obj["id"]) if isinstance(obj, dict) and "id" in obj else where
    return SourceDocument(doc_id=doc_id, doc=obj, segments=segments, base_dir=base_dir, where=where)


def read_documents(paths: Sequence[str | os.PathLike]) -> Iterator[SourceDocument]:
    """Documents of JSONL files in order; blank lines are skipped."""
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"documents file not found: {p}")
        with p.open("rb") as f:  # bytes: each line is decoded on its own (parse_document_line)
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield parse_document_line(line, where=f"{p}:{lineno}", base_dir=p.parent)


def count_documents(paths: Sequence[str | os.PathLike]) -> int:
    n = 0
    for p in paths:
        with open(p, "rb") as f:
            n += sum(1 for line in f if line.strip())
    return n


def document_parts(doc: SourceDocument, *,
                   image_decoder: Callable[[np.ndarray], Any] | None = None) -> QueryParts:
    """Split a document into CLIP inputs: its texts joined by spaces and its images.

    ``{"image_tokens"}`` segments become images only through ``image_decoder`` (VQ codes -> PIL);
    without one they are skipped (the document is then encoded by its text alone).
    """
    texts, images = [], []
    for seg in doc.segments:
        if "text" in seg:
            texts.append(str(seg["text"]))
        elif "image" in seg:
            path = doc.base_dir / seg["image"]
            try:  # pixel count bounded from the header before decoding
                images.append(load_rgb_image(path))
            except InputError as e:
                raise ValueError(f"{doc.where}: cannot read image {path} ({e.detail})") from None
        elif image_decoder is not None:
            try:
                codes = check_int_list(seg["image_tokens"], lo=0, hi=INT64_MAX, what="image_tokens")
            except InputError as e:
                raise ValueError(f"{doc.where}: {e.detail}") from None
            images.append(image_decoder(codes))
    parts = QueryParts(text=" ".join(t.strip() for t in texts if t.strip()) or None, images=images)
    if parts.is_empty():
        raise ValueError(f"{doc.where}: document has no text and no readable image to encode")
    return parts


# ---- building ---------------------------------------------------------------------------------
class DocumentEncoder(Protocol):
    dim: int

    def describe(self) -> dict[str, Any]: ...

    def encode_documents(self, docs: Sequence[QueryParts], *, drop_rate: float = 0.0,
                         rng: np.random.Generator | None = None,
                         progress: bool = False) -> np.ndarray: ...


Tokenize = Callable[[SourceDocument], Any]
"""SourceDocument -> token ids (np.ndarray), or a (tokens, loss_mask) tuple whose tokens are kept."""


@dataclass
class BankBuildConfig:
    """How a memory bank is built."""

    shard_size: int = 4096
    """Documents per resumable shard."""
    store_query_vectors: bool = False
    """Also store each document encoded with query dropout (``query_vectors.npy``)."""
    query_dropout: float = 0.2
    """Fraction of query tokens dropped for ``query_vectors.npy``."""
    seed: int = 0
    """Seed of that query dropout."""
    index: IndexConfig = field(default_factory=IndexConfig)
    """The faiss index built over the bank."""

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if isinstance(self.index, dict):
            self.index = IndexConfig.from_dict(self.index)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _load_npy(path: Path, *, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` of one bank array; a missing, truncated or foreign file is named."""
    try:
        return np.load(path, mmap_mode=mmap_mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: bank file missing (incomplete or damaged bank)") from None
    except (ValueError, OSError, EOFError) as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ValueError(f"{path}: not a readable .npy array (truncated or corrupt?): {first}") from None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def content_hash(tokens: np.ndarray) -> int:
    """64-bit hash of a token sequence's values (dtype-independent)."""
    data = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64)).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _as_tokens(out: Any, *, where: str) -> np.ndarray:
    if isinstance(out, tuple):
        out = out[0]
    arr = np.asarray(out)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{where}: tokenize returned shape {arr.shape} dtype {arr.dtype}, want 1-D ints")
    if arr.size and (arr.min() < 0 or arr.max() >= 2**31):
        raise ValueError(f"{where}: token ids outside [0, 2**31)")
    return arr.astype(np.int32)


def _write_shard(shard_dir: Path, index: int, *, vectors: np.ndarray, query_vectors: np.ndarray | None,
                 token_seqs: Sequence[np.ndarray], doc_ids: Sequence[str]) -> None:
    stem = shard_dir / f"{index:06d}"
    lengths = np.array([t.size for t in token_seqs], dtype=np.int64)
    flat = np.concatenate([np.asarray(t, np.int32) for t in token_seqs]) if token_seqs else np.zeros(0, np.int32)
    _atomic_save_npy(Path(f"{stem}.vectors.npy"), vectors.astype(np.float32))
    if query_vectors is not None:
        _atomic_save_npy(Path(f"{stem}.query_vectors.npy"), query_vectors.astype(np.float32))
    _atomic_save_npy(Path(f"{stem}.tokens.npy"), flat)
    _atomic_save_npy(Path(f"{stem}.lengths.npy"), lengths)
    _atomic_save_npy(Path(f"{stem}.hashes.npy"),
                     np.array([content_hash(t) for t in token_seqs], dtype=np.uint64))
    _atomic_write_text(Path(f"{stem}.ids.json"), json.dumps(list(doc_ids)))


def _fingerprint(*, sources: Sequence[str], encoder: dict[str, Any], config: BankBuildConfig) -> dict:
    return {"sources": [str(s) for s in sources], "encoder": encoder, "shard_size": config.shard_size,
            "store_query_vectors": config.store_query_vectors,
            "query_dropout": config.query_dropout, "seed": config.seed}


def build_memory_bank(
    *, documents: Iterable[SourceDocument], out_dir: str | os.PathLike, encoder: DocumentEncoder,
    tokenize: Tokenize, config: BankBuildConfig, sources: Sequence[str] = (),
    vocab: VocabManifest | None = None, image_decoder: Callable[[np.ndarray], Any] | None = None,
    resume: bool = True, total: int | None = None, progress: bool = True,
) -> "MemoryBank":
    """Encode and tokenize ``documents`` into a bank at ``out_dir`` (resumable), then index it.

    ``sources`` (the input file names) and the encoder's ``describe()`` fingerprint a build: a
    resumed build whose fingerprint differs stops instead of mixing two banks.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").exists():
        if resume:
            return MemoryBank.load(out)
        raise FileExistsError(f"{out}: a memory bank already exists there")
    shard_dir = out / "shards"
    state_path = out / STATE_FILE
    fp = _fingerprint(sources=sources, encoder=encoder.describe(), config=config)
    state = {"fingerprint": fp, "shards": []}
    if state_path.exists() and resume:
        old = read_json(state_path, what="unfinished bank build state")
        if old.get("fingerprint") != fp:
            raise ValueError(f"{state_path}: unfinished build with other inputs or encoder; "
                             "remove the folder or build elsewhere")
        state = old
    else:
        shutil.rmtree(shard_dir, ignore_errors=True)
    shard_dir.mkdir(exist_ok=True)
    done = sum(s["count"] for s in state["shards"])

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=done, desc="memory bank", unit="doc", file=sys.stderr)

    def flush(batch: list[SourceDocument]) -> None:
        token_seqs = [_as_tokens(tokenize(d), where=d.where) for d in batch]  # validates first
        parts = [document_parts(d, image_decoder=image_decoder) for d in batch]
        vectors = encoder.encode_documents(parts)
        idx = len(state["shards"])
        rng = np.random.default_rng([config.seed, idx])  # per shard: a resumed build draws the same
        qvec = (encoder.encode_documents(parts, drop_rate=config.query_dropout, rng=rng)
                if config.store_query_vectors else None)
        _write_shard(shard_dir, idx, vectors=vectors, query_vectors=qvec, token_seqs=token_seqs,
                     doc_ids=[d.doc_id for d in batch])
        state["shards"].append({"index": idx, "count": len(batch)})
        _atomic_write_text(state_path, json.dumps(state, indent=1))
        if bar is not None:
            bar.update(len(batch))

    batch: list[SourceDocument] = []
    for i, doc in enumerate(documents):
        if i < done:
            continue
        batch.append(doc)
        if len(batch) == config.shard_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if bar is not None:
        bar.close()
    if not state["shards"]:
        raise ValueError("no documents to build a memory bank from")
    return _consolidate(out, state=state, dim=encoder.dim, encoder=encoder.describe(),
                        sources=sources, vocab=vocab, config=config, progress=progress)


def write_memory_bank(
    *, out_dir: str | os.PathLike, vectors: np.ndarray, doc_ids: Sequence[str],
    token_seqs: Sequence[np.ndarray], config: BankBuildConfig | None = None,
    query_vectors: np.ndarray | None = None, vocab: VocabManifest | None = None,
    encoder: dict[str, Any] | None = None, progress: bool = False,
) -> "MemoryBank":
    """A bank from precomputed vectors (synthetic banks, benchmarks, tests); same layout."""
    config = config or BankBuildConfig()
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(doc_ids) or len(doc_ids) != len(token_seqs):
        raise ValueError(f"vectors {vectors.shape}, {len(doc_ids)} ids and {len(token_seqs)} token "
                         "sequences must agree")
    out = Path(out_dir)
    if (out / "manifest.json").exists():
        raise FileExistsError(f"{out}: a memory bank already exists there")
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    _write_shard(shard_dir, 0, vectors=vectors, query_vectors=query_vectors,
                 token_seqs=[_as_tokens(t, where=f"token_seqs[{i}]") for i, t in enumerate(token_seqs)],
                 doc_ids=doc_ids)
    state = {"shards": [{"index": 0, "count": len(doc_ids)}]}
    cfg = dataclasses.replace(config, store_query_vectors=query_vectors is not None)
    return _consolidate(out, state=state, dim=vectors.shape[1], encoder=encoder or {"type": "given"},
                        sources=[], vocab=vocab, config=cfg, progress=progress)


def _consolidate(out: Path, *, state: dict, dim: int, encoder: dict, sources: Sequence[str],
                 vocab: VocabManifest | None, config: BankBuildConfig, progress: bool) -> "MemoryBank":
    shard_dir = out / "shards"
    stems = [shard_dir / f"{s['index']:06d}" for s in state["shards"]]
    n = sum(s["count"] for s in state["shards"])
    n_tok = sum(int(np.load(f"{st}.lengths.npy").sum()) for st in stems)

    def gather(suffix: str, shape: tuple[int, ...], dtype) -> None:
        tmp = out / f"{suffix}.tmp.npy"
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        pos = 0
        for st in stems:
            part = np.load(f"{st}.{suffix}.npy", mmap_mode="r")
            arr[pos:pos + len(part)] = part
            pos += len(part)
        arr.flush()
        del arr
        os.replace(tmp, out / f"{suffix}.npy")

    gather("vectors", (n, dim), np.float32)
    if config.store_query_vectors:
        gather("query_vectors", (n, dim), np.float32)
    gather("tokens", (n_tok,), np.int32)
    gather("hashes", (n,), np.uint64)
    lengths = np.concatenate([np.load(f"{st}.lengths.npy") for st in stems])
    _atomic_save_npy(out / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    ids: list[str] = []
    for st in stems:
        ids += read_json(f"{st}.ids.json", what="shard document ids", expect=list)
    _atomic_write_text(out / "doc_ids.json", json.dumps(ids))

    vectors = np.load(out / "vectors.npy", mmap_mode="r")
    if progress:
        print(f"building {config.index.kind} index over {n} vectors", file=sys.stderr)
    save_index(build_index(vectors, config=config.index), out / "index.faiss")
    manifest = {
        "kind": BANK_KIND, "version": BANK_VERSION, "count": n, "dim": dim, "encoder": encoder,
        "sources": [str(s) for s in sources], "vocab": vocab.to_dict() if vocab else None,
        "has_query_vectors": bool(config.store_query_vectors),
        "query_dropout": config.query_dropout if config.store_query_vectors else None,
        "index": {"file": "index.faiss", "config": config.index.to_dict()},
    }
    _atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(shard_dir, ignore_errors=True)
    (out / STATE_FILE).unlink(missing_ok=True)
    return MemoryBank.load(out)


# ---- loading ----------------------------------------------------------------------------------
class MemoryBank:
    """A built bank, memory-mapped: ``vectors`` (N, D), ``doc_ids``, ``tokens(row)``."""

    def __init__(self, path: Path, manifest: dict[str, Any], *, mmap: bool) -> None:
        mode = "r" if mmap else None
        self.path = path
        self.manifest = manifest
        self.vectors: np.ndarray = _load_npy(path / "vectors.npy", mmap_mode=mode)
        self.query_vectors: np.ndarray | None = (
            _load_npy(path / "query_vectors.npy", mmap_mode=mode) if manifest["has_query_vectors"] else None)
        self._tokens = _load_npy(path / "tokens.npy", mmap_mode=mode)
        self.offsets: np.ndarray = _load_npy(path / "offsets.npy")
        self.hashes: np.ndarray = _load_npy(path / "hashes.npy")
        self.doc_ids: list[str] = read_json(path / "doc_ids.json", what="bank document ids", expect=list)
        self._row_of: dict[str, int] | None = None
        n = manifest["count"]
        if not (self.vectors.shape == (n, manifest["dim"]) and len(self.doc_ids) == n
                and self.offsets.shape == (n + 1,) and self.hashes.shape == (n,)):
            raise ValueError(f"{path}: bank files disagree with manifest.json (count {n}, dim "
                             f"{manifest['dim']}; vectors {self.vectors.shape})")

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True) -> "MemoryBank":
        path = Path(path)
        mpath = path / "manifest.json"
        if not mpath.exists():
            hint = " (unfinished build: rerun `jam-retrieval build`)" if (path / STATE_FILE).exists() else ""
            raise FileNotFoundError(f"memory bank manifest not found: {mpath}{hint}")
        manifest = read_json(mpath, what="memory bank manifest")
        if manifest.get("kind") != BANK_KIND or manifest.get("version") != BANK_VERSION:
            raise ValueError(f"{mpath}: not a version-{BANK_VERSION} {BANK_KIND}")
        missing = [k for k in ("count", "dim", "has_query_vectors", "index") if k not in manifest]
        index = manifest.get("index")
        if missing or not (isinstance(index, dict) and isinstance(index.get("file"), str)
                           and isinstance(index.get("config"), dict)):
            raise ValueError(f"{mpath}: incomplete memory bank manifest (missing {missing or ['index.file/config']})")
        return cls(path, manifest, mmap=mmap)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def vocab(self) -> VocabManifest | None:
        v = self.manifest.get("vocab")
        return VocabManifest.from_dict(v, source=str(self.path / "manifest.json")) if v else None

    def tokens(self, row: int) -> np.ndarray:
        """Token ids of document ``row`` (int64 copy)."""
        if not 0 <= row < len(self):
            raise IndexError(f"bank row {row} out of range [0, {len(self)})")
        return np.asarray(self._tokens[self.offsets[row]:self.offsets[row + 1]], dtype=np.int64)

    def row_of(self, doc_id: str) -> int:
        if self._row_of is None:
            self._row_of = {d: i for i, d in enumerate(self.doc_ids)}
        try:
            return self._row_of[doc_id]
        except KeyError:
            raise KeyError(f"document id {doc_id!r} not in bank {self.path}") from None

    @property
    def index_config(self) -> IndexConfig:
        return IndexConfig.from_dict(self.manifest["index"]["config"])

    def load_index(self, *, overrides: dict[str, Any] | None = None):
        """The bank's faiss index with its stored config, search parameters optionally overridden."""
        cfg = dataclasses.replace(self.index_config, **(overrides or {}))
        return load_index(self.path / self.manifest["index"]["file"], config=cfg)

    def rebuild_index(self, *, config: IndexConfig) -> None:
        """Replace the bank's index with a new kind or parameters (manifest updated atomically)."""
        save_index(build_index(self.vectors, config=config), self.path / "index.faiss")
        self.manifest["index"] = {"file": "index.faiss", "config": config.to_dict()}
        _atomic_write_text(self.path / "manifest.json", json.dumps(self.manifest, indent=2) + "\n")

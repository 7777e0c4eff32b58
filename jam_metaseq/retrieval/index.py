"""faiss indexes over the memory bank for maximum inner product search (paper §3.1, MIPS).

Document vectors are L2-normalised CLIP embeddings, so inner product = cosine similarity.
- ``flat``: exact search (``IndexFlatIP``), the reference every approximate index is measured
  against.
- ``ivf``: inverted file with flat lists (``IndexIVFFlat``, inner-product metric); ``nlist`` k-means
  cells, ``nprobe`` cells visited per query. The choice for large banks and for faiss-gpu.
- ``hnsw``: graph index (``IndexHNSWFlat``, inner-product metric); ``hnsw_m`` links per node,
  ``ef_construction`` / ``ef_search`` beam widths. CPU only.
faiss-gpu is used when present (``faiss.get_num_gpus() > 0``) for flat and ivf, unless
``use_gpu=False``; indexes are always saved in their CPU form.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

IndexKind = Literal["flat", "ivf", "hnsw"]
INDEX_KINDS: tuple[str, ...] = ("flat", "ivf", "hnsw")


@dataclass
class IndexConfig:
    """Which faiss index to build and its search parameters."""

    kind: IndexKind = "flat"
    """``flat`` (exact), ``ivf`` or ``hnsw`` (approximate)."""
    nlist: int | None = None
    """IVF cells; None = about 4 * sqrt(N), clamped to [1, N // 39]."""
    nprobe: int = 32
    """IVF cells visited per query."""
    train_size: int = 131072
    """At most this many vectors (a random sample) train the IVF k-means."""
    train_iters: int = 10
    """IVF k-means iterations."""
    hnsw_m: int = 32
    """HNSW links per node."""
    ef_construction: int = 80
    """HNSW beam width while building."""
    ef_search: int = 128
    """HNSW beam width while searching."""
    use_gpu: bool | None = None
    """None = use faiss-gpu when it is installed and sees a GPU; False = never."""
    seed: int = 0
    """Seed of the IVF training sample and k-means."""

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index kind {self.kind!r} not in {INDEX_KINDS}")
        for name in ("nprobe", "train_size", "train_iters", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"index {name} must be >= 1, got {getattr(self, name)}")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"index nlist must be >= 1, got {self.nlist}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IndexConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _faiss():
    import faiss  # imported lazily: a host that never retrieves does not need it

    return faiss


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def default_nlist(n: int) -> int:
    # faiss warns below 39 training points per centroid; 4 * sqrt(N) is its usual rule of thumb.
    return int(max(1, min(round(4 * np.sqrt(max(n, 1))), n // 39)))


def _as_f32(vectors: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.ndim != 2:
        raise ValueError(f"vectors must be (N, D), got shape {v.shape}")
    return v


def build_index(vectors: np.ndarray, *, config: IndexConfig, add_batch: int = 65536):
    """Build a CPU faiss index over ``vectors`` (N, D) float32; row i gets id i."""
    faiss = _faiss()
    xb = _as_f32(vectors)
    n, d = xb.shape
    if config.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif config.kind == "ivf":
        nlist = config.nlist or default_nlist(n)
        if nlist > n:
            raise ValueError(f"ivf nlist={nlist} exceeds the {n} vectors in the bank")
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = config.seed
        index.cp.niter = config.train_iters
        rng = np.random.default_rng(config.seed)
        sample = xb if n <= config.train_size else xb[np.sort(rng.choice(n, config.train_size, replace=False))]
        index.train(np.ascontiguousarray(sample))
    else:
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
    for start in range(0, n, add_batch):
        index.add(xb[start:start + add_batch])
    set_search_params(index, config=config)
    return index


def set_search_params(index, *, config: IndexConfig) -> None:
    faiss = _faiss()
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexIVF):
        base.nprobe = config.nprobe
    elif isinstance(base, faiss.IndexHNSW):
        base.hnsw.efSearch = config.ef_search


def to_search_device(index, *, config: IndexConfig):
    """Move a CPU index to all GPUs when allowed and supported; HNSW stays on CPU."""
    if config.use_gpu is False or config.kind == "hnsw" or not gpu_available():
        return index
    faiss = _faiss()
    gpu_index = faiss.index_cpu_to_all_gpus(index)
    try:
        faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", config.nprobe)
    except Exception:  # flat GPU indexes have no nprobe
        pass
    return gpu_index


def save_index(index, path: str | os.PathLike) -> None:
    """Write the CPU form of ``index`` atomically (temp file + rename)."""
    faiss = _faiss()
    path = Path(path)
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        index = faiss.index_gpu_to_cpu(index)
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def load_index(path: str | os.PathLike, *, config: IndexConfig, mmap: bool = False):
    """Read an index written by ``save_index``, apply ``config``'s search parameters."""
    faiss = _faiss()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"faiss index not found: {path}")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as e:  # faiss reports a foreign or truncated file as a RuntimeError
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        cause = first.rsplit(".cpp:", 1)[-1].split(": ", 1)[-1]  # "Error in f() at x.cpp:12: cause"
        raise ValueError(f"{path}: not a readable faiss index (truncated or corrupt?): {cause}") from None
    set_search_params(index, config=config)
    return to_search_device(index, config=config)


def search(index, queries: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products: ``(scores (Q, k) float32, rows (Q, k) int64)``; missing = -1."""
    xq = _as_f32(queries)
    k = int(min(k, index.ntotal))
    if k <= 0:
        return np.zeros((xq.shape[0], 0), np.float32), np.zeros((xq.shape[0], 0), np.int64)
    scores, rows = index.search(xq, k)
    return scores, rows.astype(np.int64)


def recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray, *, k: int) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k."""
    a, e = approx_rows[:, :k], exact_rows[:, :k]
    hits = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, e))
    return hits / float(k * a.shape[0])

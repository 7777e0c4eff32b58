"""Benchmark: exact vs approximate MIPS over synthetic CLIP-like banks (paper §3.1, issue 7).

For each bank size: build the exact ``IndexFlatIP`` (the baseline) and the approximate indexes
(IVF-Flat, HNSW) with ``jam_metaseq.retrieval.index``; time the builds; search the same held-out
queries with each, reporting queries/s, the speed-up over the exact index measured in the same
run, and recall@2 against the exact top-2. Target (issue 7): recall@2 >= 0.95 at >= 10x the
exact index's queries/s.

The vectors are L2-normalised draws from a mixture of Gaussian clusters on the sphere (as CLIP
embeddings cluster by topic); queries are fresh draws from the same mixture, not bank members.
``--clusters 0`` gives unstructured random vectors, the worst case for any partitioning index.

  python benchmarks/bench_retrieval.py                       # 100k and 1M, 512-d
  python benchmarks/bench_retrieval.py --sizes 100000 --nprobe 8 16 32
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np

from jam_metaseq.retrieval.index import IndexConfig, build_index, default_nlist, recall_at_k, search


def synthetic_bank(n: int, d: int, *, clusters: int, spread: float, rng: np.random.Generator,
                   centres: np.ndarray | None, chunk: int = 65536) -> np.ndarray:
    """(n, d) float32 unit vectors around ``centres`` (clusters=0: isotropic random)."""
    out = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = rng.standard_normal((m, d), dtype=np.float32)
        if centres is not None:
            x = centres[rng.integers(0, len(centres), m)] + spread * x
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


@dataclass
class Row:
    size: int
    index: str
    params: str
    build_s: float
    qps: float
    recall: float
    speedup: float = 1.0


def timed_search(index, queries: np.ndarray, *, k: int, batch: int) -> tuple[np.ndarray, float]:
    rows = []
    t0 = time.perf_counter()
    for s in range(0, len(queries), batch):
        rows.append(search(index, queries[s:s + batch], k=k)[1])
    dt = time.perf_counter() - t0
    return np.concatenate(rows), len(queries) / dt


def run(args: argparse.Namespace) -> list[Row]:
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    centres = (rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
               if args.clusters > 0 else None)
    queries = synthetic_bank(args.queries, args.dim, clusters=args.clusters, spread=args.spread,
                             rng=rng, centres=centres)
    table: list[Row] = []
    for n in args.sizes:
        print(f"[{n}] generating {n} x {args.dim} vectors", file=sys.stderr)
        xb = synthetic_bank(n, args.dim, clusters=args.clusters, spread=args.spread, rng=rng,
                            centres=centres)
        t0 = time.perf_counter()
        flat = build_index(xb, config=IndexConfig(kind="flat", use_gpu=False))
        build = time.perf_counter() - t0
        exact, flat_qps = timed_search(flat, queries, k=args.k, batch=args.batch)
        table.append(Row(n, "flat", "exact", build, flat_qps, 1.0))
        print(f"[{n}] flat: {flat_qps:.0f} q/s", file=sys.stderr)
        del flat
        if "ivf" in args.kinds:
            nlist = args.nlist or default_nlist(n)
            cfg = IndexConfig(kind="ivf", nlist=nlist, train_size=args.train_size,
                              train_iters=args.train_iters, use_gpu=False, seed=args.seed)
            t0 = time.perf_counter()
            index = build_index(xb, config=cfg)
            build = time.perf_counter() - t0
            for nprobe in args.nprobe:
                faiss.downcast_index(index).nprobe = nprobe
                rows, qps = timed_search(index, queries, k=args.k, batch=args.batch)
                table.append(Row(n, "ivf", f"nlist={nlist} nprobe={nprobe}", build, qps,
                                 recall_at_k(rows, exact, k=args.k), qps / flat_qps))
                print(f"[{n}] {table[-1]}", file=sys.stderr)
            del index
        if "hnsw" in args.kinds:
            if n > args.hnsw_max_size:
                print(f"[{n}] hnsw skipped (> --hnsw-max-size {args.hnsw_max_size})", file=sys.stderr)
            else:
                cfg = IndexConfig(kind="hnsw", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                                  use_gpu=False)
                t0 = time.perf_counter()
                index = build_index(xb, config=cfg)
                build = time.perf_counter() - t0
                for ef in args.ef_search:
                    faiss.downcast_index(index).hnsw.efSearch = ef
                    rows, qps = timed_search(index, queries, k=args.k, batch=args.batch)
                    table.append(Row(n, "hnsw", f"M={args.hnsw_m} efC={args.ef_construction} ef={ef}",
                                     build, qps, recall_at_k(rows, exact, k=args.k), qps / flat_qps))
                    print(f"[{n}] {table[-1]}", file=sys.stderr)
                del index
        del xb
    return table


def print_table(table: list[Row], *, k: int, target_recall: float, target_speedup: float) -> None:
    head = f"{'N':>9} {'index':<5} {'params':<28} {'build s':>8} {'queries/s':>10} {'x flat':>7} " \
           f"{'recall@' + str(k):>9} {'target':>6}"
    print(head)
    print("-" * len(head))
    for r in table:
        ok = "" if r.index == "flat" else ("yes" if r.recall >= target_recall and r.speedup >= target_speedup
                                           else "no")
        print(f"{r.size:>9} {r.index:<5} {r.params:<28} {r.build_s:>8.2f} {r.qps:>10.0f} "
              f"{r.speedup:>7.1f} {r.recall:>9.3f} {ok:>6}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="bank sizes")
    p.add_argument("--dim", type=int, default=512, help="vector dimension (ViT-B-32: 512)")
    p.add_argument("--queries", type=int, default=1000, help="held-out queries per size")
    p.add_argument("-k", "--k", type=int, default=2, help="neighbours per query (recall@k)")
    p.add_argument("--batch", type=int, default=1000, help="queries per search call")
    p.add_argument("--clusters", type=int, default=1000, help="mixture components (0 = isotropic)")
    p.add_argument("--spread", type=float, default=0.5, help="within-cluster noise scale (centres ~ N(0, I))")
    p.add_argument("--kinds", nargs="+", choices=("ivf", "hnsw"), default=["ivf", "hnsw"],
                   help="approximate indexes to compare with the exact one")
    p.add_argument("--nlist", type=int, default=None, help="ivf cells (default about 4*sqrt(N))")
    p.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32], help="ivf nprobe values to try")
    p.add_argument("--train-size", type=int, default=100_000, help="ivf k-means training sample")
    p.add_argument("--train-iters", type=int, default=10, help="ivf k-means iterations")
    p.add_argument("--hnsw-m", type=int, default=32, help="hnsw links per node")
    p.add_argument("--ef-construction", type=int, default=80, help="hnsw build beam width")
    p.add_argument("--ef-search", type=int, nargs="+", default=[64, 128], help="hnsw efSearch values to try")
    p.add_argument("--hnsw-max-size", type=int, default=200_000,
                   help="skip hnsw above this bank size (its build is slow on few cores)")
    p.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0 = faiss default)")
    p.add_argument("--seed", type=int, default=0, help="data and k-means seed")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.sizes) <= 0 or args.queries <= 0 or args.k <= 0:
        print("bench_retrieval: error: --sizes, --queries and -k must be positive", file=sys.stderr)
        return 1
    table = run(args)
    print_table(table, k=args.k, target_recall=0.95, target_speedup=10.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

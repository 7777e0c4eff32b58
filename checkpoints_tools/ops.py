"""Streaming checkpoint operations: reshard, merge (JAM-Uniform), widen (JAM-Width), cross (JAM-Cross).

Paper §2.1.1-2.1.3. The fusion math is ``jam_metaseq.fusion`` (pure, tensor-wise, fp32); this
module feeds it one tensor name at a time from lazy readers and hands each result to an
``OutputDir``, so memory stays at a few tensors whatever the model size. Every check that can
fail on shapes and layouts (parents that differ, missing tensors, mixed dtypes, target MP, the
output directory, disk space) runs before the first byte is written; checks of tensor contents
(model-parallel copies of a replicated tensor that differ) run as the tensor is read. Any error
or interrupt removes the temp output.

Throughput (issue 4: >= 0.5x a plain copy of the same bytes): parents are read straight into
reused buffers (``workspace``), the fusion math runs in fp32 chunks that are cast into the output
buffer (``kernels``, bit-identical to ``jam_metaseq.fusion``), writing overlaps the next tensor's
read and math (``stream_to``: two output buffers, one writer thread per output file), a tied
output projection is aliased instead of recomputed, torch runs one thread, and source hashes are
reused from a jam-ckpt source's manifest when size and mtime say the file is unchanged.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from checkpoints_tools import kernels
from checkpoints_tools.readers import Reader, open_checkpoint
from checkpoints_tools.safe_load import CheckpointError
from checkpoints_tools.workspace import Workspace
from checkpoints_tools.writers import TIED, OutputDir, OutputSpec, sha256_file
from jam_metaseq.fusion.cross import DEFAULT_INIT_SEED_SCHEME, INIT_SEED_SCHEMES, cross_plan
from jam_metaseq.models.config import (
    SHAPE_FIELDS, CrossConfig, DecoderConfig, ModelConfig, cross_of, uniform_of, width_of,
)
from jam_metaseq.vocab import VocabManifest


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=not enabled, leave=False)


def _parent_shape_cfg(cfg: ModelConfig) -> DecoderConfig:
    return cfg.parent if isinstance(cfg, CrossConfig) else cfg


def load_vocab(path: str | os.PathLike | None, *, cfg: ModelConfig,
               sources: Sequence[Reader] = ()) -> dict[str, Any] | None:
    """The vocab manifest to store with an output: ``path`` if given (checked against the
    embedding), else the first source's own manifest."""
    if path is not None:
        v = VocabManifest.load(path)
        try:
            v.check_embedding(cfg.vocab_size, what="output model")
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        return v.to_dict()
    for r in sources:
        d = r.vocab_dict()
        if d is not None:
            return d
    return None


SMALL_TENSOR = 4 << 20
"""Tensors below this many bytes (biases, norms) are streamed through their own small buffers
rather than the two reused big-tensor slots (see ``stream_to``)."""
SMALL_IN_FLIGHT = 64 << 20
"""At most this many bytes of small tensors wait for their writers at once."""


HASH_SOURCES = ("auto", "full", "none")
"""How sources are hashed into the manifest: ``auto`` takes a file's sha256 from the manifest.json
next to it when that manifest (a jam-ckpt output's) lists the file with its current size and the
file is not newer than the manifest, and reads and hashes it otherwise; ``full`` always reads
and hashes; ``none`` records sizes only."""

HASH_LEAD = 512 << 20
"""How far (bytes) a source file's hashing may run ahead of the stream's reads of that file."""


def _hash_policy(hash_sources: bool | str) -> str:
    if hash_sources is True:
        return "auto"
    if hash_sources is False:
        return "none"
    if hash_sources not in HASH_SOURCES:
        raise ValueError(f"hash_sources must be one of {HASH_SOURCES}, got {hash_sources!r}")
    return hash_sources


class SourceHash:
    """The manifest's record of one source, hashed while the stream reads it.

    One thread per file reads it sequentially and hashes it (hashlib and file reads release the
    GIL), paced to stay at most ``HASH_LEAD`` bytes ahead of the stream's position in that
    reader (``Reader.read_fraction``): the pages the hash reads are the ones the stream is about
    to read, so each byte comes from the disk once even when the parents do not fit in the page
    cache (a hash pass before or after the stream would read them twice). ``release`` lifts the
    pacing (the stream is done, or failed); ``result`` waits for the record."""

    def __init__(self, role: str, reader: Reader, *, policy: str) -> None:
        self.role, self.reader, self.policy = role, reader, policy
        self._released = threading.Event()
        self._cancelled = False
        self._record = {"role": role, "path": str(reader.path), "format": reader.format, "mp": reader.mp,
                        "fsdp": reader.fsdp, "files": {}}
        self._threads: dict[str, threading.Thread] = {}
        self._results: dict[str, str | BaseException] = {}
        known: dict[Path, tuple[dict[str, Any], int]] = {}
        todo = []
        for f in reader.files:
            st = f.stat()
            rec: dict[str, Any] = {"bytes": st.st_size, "sha256": None, "sha256_from": None}
            if policy == "auto":
                if f.parent not in known:
                    known[f.parent] = _manifest_hashes(f.parent)
                table, mtime = known[f.parent]
                entry = table.get(f.name)
                if isinstance(entry, dict) and entry.get("bytes") == st.st_size and entry.get("sha256") \
                        and st.st_mtime_ns <= mtime:
                    rec.update(sha256=entry["sha256"], sha256_from="manifest")
            if policy != "none" and rec["sha256"] is None:
                todo.append(f)
            self._record["files"][str(f)] = rec
        for f in todo:  # daemon threads: a paced hash never holds up the exit of a failed run
            t = threading.Thread(target=self._run, args=(f,), name=f"jam-ckpt-hash:{f.name}", daemon=True)
            self._threads[str(f)] = t
            t.start()

    def _run(self, path: Path) -> None:
        try:
            self._results[str(path)] = self._hash_file(path)
        except BaseException as e:  # re-raised by result()
            self._results[str(path)] = e

    def _wait_until_allowed(self, pos: int, size: int) -> None:
        """Block while byte ``pos`` of a ``size``-byte file is more than ``HASH_LEAD`` ahead of
        the reader's progress (until ``release``)."""
        while not self._released.is_set() and pos > self.reader.read_fraction() * size + HASH_LEAD:
            self._released.wait(0.005)

    def _hash_file(self, path: Path, chunk: int = 8 << 20) -> str | None:
        size = path.stat().st_size

        def before_read(pos: int) -> bool:
            self._wait_until_allowed(pos, size)
            return not self._cancelled

        return sha256_file(path, chunk=chunk, before_read=before_read)

    def release(self) -> None:
        self._released.set()

    def cancel(self) -> None:
        """Stop hashing (the stream failed); the threads end at their next chunk."""
        self._cancelled = True
        self._released.set()

    def result(self) -> dict[str, Any]:
        self.release()
        for name, t in self._threads.items():
            t.join()
            r = self._results[name]
            if isinstance(r, BaseException):
                raise CheckpointError(f"{name}: hashing the source failed: {r}") from r
            self._record["files"][name].update(sha256=r, sha256_from="read")
        return self._record


def source_record(role: str, reader: Reader, *, hash_sources: bool | str) -> SourceHash:
    """The manifest's record of one source (``SourceHash``: hashed while the stream reads it).
    ``hash_sources``: see ``HASH_SOURCES`` (True = auto, False = none)."""
    return SourceHash(role, reader, policy=_hash_policy(hash_sources))


def _manifest_hashes(d: Path) -> tuple[dict[str, Any], int]:
    """(files table, mtime_ns) of a jam-ckpt manifest.json in ``d``, or ({}, 0)."""
    m = d / "manifest.json"
    try:
        data = json.loads(m.read_text())
        if data.get("created_by") == "jam-ckpt" and isinstance(data.get("files"), dict):
            return data["files"], m.stat().st_mtime_ns
    except (OSError, ValueError):
        pass
    return {}, 0


_INIT_FNS: set[Any] | None = None


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Parameter init as a no-op while a model is built on the meta device: random fills of meta
    tensors go through torch's Python refs, whose first use imports ``torch._dynamo`` (~2 s of a
    jam-ckpt run); the shapes do not depend on them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _INIT_FNS:
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


@functools.lru_cache(maxsize=32)
def _shapes(cfg_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    global _INIT_FNS
    from jam_metaseq.models import build_model, config_from_json

    if _INIT_FNS is None:
        _INIT_FNS = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.random_}
        _INIT_FNS |= {getattr(torch.nn.init, n) for n in dir(torch.nn.init)
                      if n.endswith("_") and not n.startswith("_")}
    with torch.device("meta"), _SkipInit():
        model = build_model(config_from_json(cfg_json))
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict(keep_vars=True).items())


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Ordered {state-dict key: shape} of the model ``cfg`` (= ``jam_metaseq.fusion.state_shapes``,
    built on the meta device without parameter init; cached by config)."""
    from jam_metaseq.models import config_to_json

    return dict(_shapes(config_to_json(cfg)))


def check_parent_tensors(reader: Reader, cfg: DecoderConfig, *, role: str) -> None:
    """The parent holds exactly the tensors (names, shapes) of a decoder shaped ``cfg``."""
    want = expected_shapes(cfg)
    have = reader.shapes()
    where = reader.files[0] if reader.files else reader.path
    for n, s in want.items():
        if n not in have:
            raise CheckpointError(f"{where}: {role} parent has no tensor {n}")
        if tuple(have[n]) != tuple(s):
            raise CheckpointError(f"{where}: {role} parent tensor {n} has shape {tuple(have[n])}, expected {tuple(s)}")
    extra = [n for n in have if n not in want]
    if extra:
        raise CheckpointError(f"{where}: {role} parent has unexpected tensor(s) {extra[:3]}")


def check_same_parents(readers: Sequence[Reader], cfgs: Sequence[DecoderConfig], roles: Sequence[str], *,
                       shapes_may_differ: bool = False) -> None:
    """Parents must agree in layers, width, FFN, heads, vocab and every tensor shape; with
    ``shapes_may_differ`` (asymmetric JAM-Cross) in vocab, positions, biases and LayerNorm kind
    only (each parent's tensors are then checked against its own config)."""
    a = cfgs[0]
    shape_fields = ("layers", "embed_dim", "ffn_dim", "heads")
    for r, c, role in zip(readers[1:], cfgs[1:], roles[1:]):
        for fld in (*shape_fields, "vocab_size", "max_positions", "bias", "affine_ln"):
            if shapes_may_differ and fld in shape_fields:
                continue
            if getattr(c, fld) != getattr(a, fld):
                raise CheckpointError(
                    f"{r.files[0] if r.files else r.path}: {role} parent has {fld}={getattr(c, fld)}, "
                    f"{roles[0]} parent ({readers[0].path}) has {getattr(a, fld)}")
        if shapes_may_differ:
            continue
        sa, sb = readers[0].shapes(), r.shapes()
        for n in sa:
            if n not in sb:
                raise CheckpointError(f"{r.path}: {role} parent has no tensor {n} ({roles[0]} parent has it)")
            if tuple(sa[n]) != tuple(sb[n]):
                raise CheckpointError(f"{r.path}: {role} parent tensor {n} has shape {tuple(sb[n])}, "
                                      f"{roles[0]} parent has {tuple(sa[n])}")
        for n in sb:
            if n not in sa:
                raise CheckpointError(f"{r.path}: {role} parent has extra tensor {n}")


def common_dtype(readers: Sequence[Reader], dtype: torch.dtype | None) -> torch.dtype:
    """The output dtype: ``dtype`` if given, else the parents' one dtype (mixed = error)."""
    dts = [r.param_dtype for r in readers]  # raises on mixed dtypes inside one checkpoint
    if dtype is not None:
        return dtype
    if len(set(dts)) > 1:
        desc = ", ".join(f"{r.path}: {d}" for r, d in zip(readers, dts))
        raise CheckpointError(f"parents have different dtypes ({desc}); choose one with --dtype")
    return dts[0]


READ_AHEAD = 256 << 20
"""How many bytes of the parents' coming tensors are asked of the OS ahead of the stream's reads."""


class ReadAhead:
    """Keeps the parents' next tensors on their way from the disk while the current one is
    computed and written: before producing target tensor k, ``advance`` asks the readers to
    prefetch (``Reader.prefetch``: ``posix_fadvise(WILLNEED)``) the sources of the targets after
    it, up to ``READ_AHEAD`` bytes ahead. With a cold page cache the stream's own reads are
    synchronous and its parents are several files read in turn, so without this the disk
    idles whenever the stream computes or writes; with the parents cached it costs nothing."""

    def __init__(self, names: Sequence[str], sources: Callable[[str], list[tuple[Reader, str]]]) -> None:
        self.names, self.sources = list(names), sources
        self.at = {n: i for i, n in enumerate(self.names)}
        self.cum = [0]
        for n in self.names:
            self.cum.append(self.cum[-1] + sum(r.info(s).nbytes for r, s in sources(n) if s in r))
        self.next = 0

    def advance(self, name: str) -> None:
        i = self.at.get(name)
        if i is None:
            return
        while self.next < len(self.names) and (self.next <= i or self.cum[self.next] - self.cum[i + 1] < READ_AHEAD):
            for r, s in self.sources(self.names[self.next]):
                if s in r:
                    r.prefetch(s)
            self.next += 1


def bound_malloc() -> None:
    """Make glibc return big freed blocks to the OS at once. Its default raises the mmap
    threshold up to 32 MiB after the first big free, so a stream of ~10 MiB fp32 temporaries
    then fragments the heap and RSS creeps up by about a layer per layer; a fixed 1 MiB
    threshold keeps it flat (measured: +19 MiB/layer -> 0 on opt_125m)."""
    if sys.platform != "linux":
        return
    try:
        import ctypes
        import ctypes.util

        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def stream_to(
    out: OutputDir,
    produce: Callable[[str, torch.Tensor], torch.Tensor],
    *,
    produced_dtypes: Mapping[str, torch.dtype],
    desc: str,
    progress: bool,
    manifest_extra: Mapping[str, Any],
    tied: bool = False,
    threads: int | None = 1,
) -> Path:
    """Produce every target tensor in order and write it; atomic commit or full cleanup.
    ``produce(name, buf)`` fills ``buf`` (the target shape, in the written dtype) and returns it.
    Writing is pipelined: while ``produce`` reads and computes big tensor k+1 into the other of
    two reused buffers, big tensor k (cast and split into MP pieces here) is written and hashed
    by one writer thread per output rank (file I/O, hashing and torch ops release the GIL), so
    the stream costs about max(read + math, write of one rank's file), not their sum. Small
    tensors (< ``SMALL_TENSOR``: biases, norms) take their own buffers and queue behind the big
    ones (up to ``SMALL_IN_FLIGHT`` bytes), so a bias between two matrices does not stop the
    overlap. Source hashes (``SourceHash``) are taken by their own threads while this runs.
    ``tied``: the output projection equals the embedding by construction (tied sources), so
    where the layout aliases them it is written as an alias and never produced.
    ``threads``: torch intra-op threads while streaming (None = leave as is). The per-chunk ops
    are memory-bound and short; with more threads each one ends in an OpenMP barrier, which on a
    busy machine waits for a descheduled thread (measured: 2 threads on 2 shared cores made a
    merge 2-12x slower than 1)."""
    started = time.time()
    bound_malloc()
    bar = None
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        alias = tied and out.aliases_tied
        if alias:
            out.expect_tied()
        out.open(produced_dtypes)
        bar = _progress(len(out.shapes), desc, progress)
        ws = Workspace()
        names = list(out.shapes)
        skip = {TIED[1]} if alias else set()
        big = [n for n in names if n not in skip and _nbytes(out.shapes[n], out.dtype_of(n)) >= SMALL_TENSOR]
        # Per slot, the largest big tensor still to come through it (sizes the two buffers).
        upcoming: dict[str, int] = {}
        most = [0, 0]
        for k in reversed(range(len(big))):
            most[k % 2] = max(most[k % 2], _nbytes(out.shapes[big[k]], out.dtype_of(big[k])))
            upcoming[big[k]] = most[k % 2]
        # Writes in flight: big tensor k reuses big tensor k-2's buffers (slot k % 2), so it
        # waits for that write only; small tensors get their own buffers (up to SMALL_IN_FLIGHT
        # bytes of them may be queued), so they never stall the overlap of big ones.
        pending_big: collections.deque[list[concurrent.futures.Future[None]]] = collections.deque()
        pending_small: collections.deque[tuple[int, list[concurrent.futures.Future[None]]]] = collections.deque()
        small_bytes = 0
        pools = [concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"jam-ckpt-write{r}")
                 for r in range(out.writer_count)]
        n_big = 0
        try:
            for name in names:
                while pending_small and (small_bytes > SMALL_IN_FLIGHT or all(f.done() for f in pending_small[0][1])):
                    nb, fs = pending_small.popleft()
                    for f in fs:
                        f.result()
                    small_bytes -= nb
                if alias and name == TIED[1]:
                    pending_small.append((0, out.add_tied(name, pools=pools)))
                elif name in upcoming:
                    while len(pending_big) > 1:
                        for f in pending_big.popleft():
                            f.result()
                    slot = n_big % 2
                    n_big += 1
                    buf = ws.get(f"out{slot}", out.shapes[name], out.dtype_of(name), upcoming=upcoming[name])
                    pending_big.append(out.add_async(name, produce(name, buf), slot=slot, pools=pools))
                else:
                    buf = torch.empty(out.shapes[name], dtype=out.dtype_of(name))
                    nb = buf.numel() * buf.element_size()
                    small_bytes += nb
                    pending_small.append((nb, out.add_async(name, produce(name, buf), slot=None, pools=pools)))
                if bar is not None:
                    bar.update(1)
            for fs in [*pending_big, *(fs for _, fs in pending_small)]:
                for f in fs:
                    f.result()
            pending_big.clear()
            pending_small.clear()
        except BaseException as e:  # noqa: B036 - queued writes are skipped from here on
            out.record_error(e)
            for fs in [*pending_big, *(fs for _, fs in pending_small)]:
                for f in fs:
                    f.cancel()
            raise
        finally:
            _join(pools)  # waits for writes in flight (before out.abort() closes the files)
        extra = dict(manifest_extra)
        extra["sources"] = [f.result() if isinstance(f, SourceHash) else f for f in extra.get("sources", [])]
        extra["seconds"] = round(time.time() - started, 3)
        return out.commit(manifest_extra=extra)
    except BaseException as e:  # noqa: B036 - any failure or interrupt: nothing is left behind
        first = out.record_error(e)
        for f in manifest_extra.get("sources", []):
            if isinstance(f, SourceHash):
                f.cancel()
        out.abort()
        if first is e or not isinstance(e, Exception):
            raise  # an interrupt stays an interrupt
        raise first from None  # an earlier failure (e.g. a writer thread's full disk) is the cause
    finally:
        torch.set_num_threads(saved_threads)
        if bar is not None:
            bar.close()


def _join(pools: Sequence[concurrent.futures.ThreadPoolExecutor]) -> None:
    """Shut the writer pools down and wait for them, even through a second interrupt (the
    files must not be closed under a running write); the first interrupt is re-raised."""
    pending: BaseException | None = None
    for p in pools:
        while True:
            try:
                p.shutdown(wait=True)
                break
            except BaseException as e:  # noqa: B036 - keep waiting, re-raise after
                pending = pending or e
    if pending is not None:
        raise pending


@dataclasses.dataclass
class CommonOptions:
    """Options shared by every writing operation."""

    spec: OutputSpec
    vocab: str | None = None
    """Vocab manifest JSON stored as vocab.json (checked against the embedding)."""
    hash_sources: bool | str = "auto"
    """Source sha256s in the manifest: ``auto`` | ``full`` | ``none`` (see ``HASH_SOURCES``;
    True = auto, False = none). Hashing reads the sources once more, on a helper thread."""
    progress: bool = True
    command: Sequence[str] | None = None
    """The command line, recorded in the manifest."""
    trust_pickle: bool = False
    replica_mismatch: str = "error"
    """Model-parallel parts whose replicated tensors differ: ``error`` or ``warn`` (use part 0's;
    ``readers.REPLICA_MISMATCH``)."""
    threads: int | None = 1
    """torch intra-op threads while streaming (see ``stream_to``; None = torch's setting)."""


def _extra(opts: CommonOptions, op: str, sources: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
    return {"operation": op, "parameters": params, "sources": sources,
            "command": list(opts.command) if opts.command else None}


def _float_dtypes(shapes: Mapping[str, Any], dtype: torch.dtype) -> dict[str, torch.dtype]:
    return {n: dtype for n in shapes}


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= int(s)
    return n


def _upcoming(names: Sequence[str], reader: Reader, *, skip: set[str]) -> dict[str, int]:
    """name -> the largest of ``reader``'s tensors among this name and the ones after it (the
    size an input buffer still needs; ``skip``: names never read)."""
    out, most = {}, 0
    for n in reversed(list(names)):
        if n not in skip and n in reader:
            most = max(most, reader.info(n).nbytes)
        out[n] = most
    return out


def _skipped(out: OutputDir, tied: bool) -> set[str]:
    return {TIED[1]} if tied and out.aliases_tied else set()


# ---- operations --------------------------------------------------------------------------------


def reshard(src: str | os.PathLike, *, opts: CommonOptions, heads: int | None = None) -> Path:
    """Any layout -> any layout (MP N->M, FSDP in/out, consolidated <-> sharded, .pt <-> safetensors)."""
    r = open_checkpoint(src, trust_pickle=opts.trust_pickle, replica_mismatch=opts.replica_mismatch)
    cfg = r.config(**({"heads": heads} if heads else {}))
    shapes = r.shapes()
    dtype_in = r.param_dtype
    vocab = load_vocab(opts.vocab, cfg=cfg, sources=[r])
    out = OutputDir(opts.spec, cfg=cfg, shapes=shapes, vocab=vocab, inputs=input_paths([r]))
    produced = {n: r.info(n).dtype for n in shapes}
    extra = _extra(opts, "reshard", [source_record("source", r, hash_sources=opts.hash_sources)],
                   source_dtype=str(dtype_in))
    return stream_to(out, r.get_into,
                     produced_dtypes=produced, desc="reshard", progress=opts.progress, threads=opts.threads,
                     manifest_extra=extra,
                     tied=r.tied(*TIED))


def input_paths(readers: Sequence[Reader]) -> list[Path]:
    """Every path the readers read (files and the paths they were opened by): the output
    must not be or contain one of them."""
    return [p for r in readers for p in (r.path, *r.files)]


def _open_parents(paths: Sequence[str | os.PathLike], roles: Sequence[str], *, opts: CommonOptions,
                  heads: int | None, role_heads: Mapping[str, int | None] | None = None,
                  shapes_may_differ: bool = False) -> tuple[list[Reader], list[DecoderConfig]]:
    readers = [open_checkpoint(p, trust_pickle=opts.trust_pickle, replica_mismatch=opts.replica_mismatch)
               for p in paths]
    cfgs = []
    for r, role in zip(readers, roles):
        h = (role_heads or {}).get(role) or heads
        c = r.config(**({"heads": h} if h else {}))
        if isinstance(c, CrossConfig):
            raise CheckpointError(f"{r.path}: {role} parent is a JAM-Cross model; parents must be decoders")
        cfgs.append(c)
    check_same_parents(readers, cfgs, roles, shapes_may_differ=shapes_may_differ)
    for r, c, role in zip(readers, cfgs, roles):
        check_parent_tensors(r, c, role=role)
    return readers, cfgs


def merge(parents: Sequence[str | os.PathLike], *, opts: CommonOptions,
          weights: Sequence[float] | None = None, heads: int | None = None) -> Path:
    """JAM-Uniform (Eq. 1), n-way: theta = sum_i w_i theta_i (default w_i = 1/n)."""
    if len(parents) < 2:
        raise CheckpointError("merge needs at least two parents")
    if weights is not None:
        if len(weights) != len(parents):
            raise CheckpointError(f"{len(parents)} parents but {len(weights)} weights")
    else:
        weights = [1.0 / len(parents)] * len(parents)
    roles = [f"#{i}" for i in range(len(parents))]
    readers, cfgs = _open_parents(parents, roles, opts=opts, heads=heads)
    cfg = uniform_of(cfgs[0])
    shapes = expected_shapes(cfg)
    dtype = common_dtype(readers, opts.spec.dtype)
    vocab = load_vocab(opts.vocab, cfg=cfg, sources=readers)
    out = OutputDir(dataclasses.replace(opts.spec, dtype=dtype), cfg=cfg, shapes=shapes, vocab=vocab,
                    inputs=input_paths(readers))

    ws = Workspace()
    tied = all(r.tied(*TIED) for r in readers)
    ups = [_upcoming(shapes, r, skip=_skipped(out, tied)) for r in readers]

    ahead = ReadAhead([n for n in shapes if n not in _skipped(out, tied)], lambda n: [(r, n) for r in readers])

    def produce(name: str, buf: torch.Tensor) -> torch.Tensor:
        ahead.advance(name)
        ins = [r.get_into(name, ws.get(f"in{i}", r.info(name).shape, r.info(name).dtype, upcoming=ups[i][name]))
               for i, r in enumerate(readers)]
        return kernels.merge_into(name, ins, buf, weights=weights)

    sources = [source_record(role, r, hash_sources=opts.hash_sources) for role, r in zip(roles, readers)]
    return stream_to(out, produce, produced_dtypes=_float_dtypes(shapes, torch.float32), desc="merge",
                     progress=opts.progress, threads=opts.threads,
                     manifest_extra=_extra(opts, "merge", sources, weights=list(weights)), tied=tied)


def widen(llm: str | os.PathLike, img: str | os.PathLike, *, opts: CommonOptions, init: str = "copy",
          heads: int | None = None) -> Path:
    """JAM-Width (Eq. 2/3): a decoder of width 2E initialised block-wise from both parents."""
    readers, cfgs = _open_parents([llm, img], ["llm", "img"], opts=opts, heads=heads)
    parent = cfgs[0]
    cfg = width_of(parent)
    shapes = expected_shapes(cfg)
    dtype = common_dtype(readers, opts.spec.dtype)
    vocab = load_vocab(opts.vocab, cfg=cfg, sources=readers)
    out = OutputDir(dataclasses.replace(opts.spec, dtype=dtype), cfg=cfg, shapes=shapes, vocab=vocab,
                    inputs=input_paths(readers))
    a, b = readers
    ws = Workspace()
    tied = a.tied(*TIED) and b.tied(*TIED)
    up_a, up_b = (_upcoming(shapes, r, skip=_skipped(out, tied)) for r in readers)

    ahead = ReadAhead([n for n in shapes if n not in _skipped(out, tied)], lambda n: [(a, n), (b, n)])

    def produce(name: str, buf: torch.Tensor) -> torch.Tensor:
        ahead.advance(name)
        ta = a.get_into(name, ws.get("in0", a.info(name).shape, a.info(name).dtype, upcoming=up_a[name]))
        tb = b.get_into(name, ws.get("in1", b.info(name).shape, b.info(name).dtype, upcoming=up_b[name]))
        return kernels.widen_into(name, ta, tb, buf, parent=parent, init=init)

    sources = [source_record(role, r, hash_sources=opts.hash_sources) for role, r in zip(("llm", "img"), readers)]
    return stream_to(out, produce, produced_dtypes=_float_dtypes(shapes, torch.float32), desc="widen",
                     progress=opts.progress, threads=opts.threads,
                     manifest_extra=_extra(opts, "widen", sources, init=init), tied=tied)


def cross(llm: str | os.PathLike, img: str | os.PathLike, *, opts: CommonOptions, cross_every: int = 2,
          init: str = "paper", seed: int = 0, image_vocab: tuple[int, int] | None = None,
          heads: int | None = None, init_seed_scheme: str = DEFAULT_INIT_SEED_SCHEME,
          img_heads: int | None = None) -> Path:
    """JAM-Cross (§2.1.3): both parents as branches, cross blocks every ``cross_every`` layers.
    ``init_seed_scheme``: how the normal init of new weights is seeded (``jam_metaseq.fusion.cross``:
    ``per-block`` draws in parallel; ``per-tensor`` reproduces outputs written before the scheme
    was recorded); recorded in the manifest's parameters.

    The parents may differ in width, FFN, depth and heads (asymmetric JAM-Cross,
    ``CrossConfig.image_parent``): the image branch takes the image parent's shape, everything
    else (vocabulary, positions, biases, LayerNorm kind, activation, embedding scale) is the
    LLM's and must agree. ``img_heads``: the image parent's heads when its checkpoint does not
    record them (default ``heads``)."""
    if init_seed_scheme not in INIT_SEED_SCHEMES:
        raise CheckpointError(f"init seed scheme must be one of {INIT_SEED_SCHEMES}, got {init_seed_scheme!r}")
    readers, cfgs = _open_parents([llm, img], ["llm", "img"], opts=opts, heads=heads, role_heads={"img": img_heads},
                                  shapes_may_differ=True)
    parent = cfgs[0]
    image_parent = dataclasses.replace(parent, **{f: getattr(cfgs[1], f) for f in SHAPE_FIELDS})
    for f in ("activation", "scale_embedding", "ln_eps", "padding_idx"):
        if getattr(cfgs[1], f) != getattr(parent, f):
            raise CheckpointError(f"{readers[1].path}: img parent has {f}={getattr(cfgs[1], f)!r}, llm parent "
                                  f"({readers[0].path}) has {getattr(parent, f)!r}; JAM-Cross parents share it")
    if image_vocab is None and opts.vocab is not None:
        v = VocabManifest.load(opts.vocab)
        image_vocab = (v.image_start, v.image_end)
    if image_vocab is None:
        for r in readers:
            d = r.vocab_dict()
            if d is not None:
                v = VocabManifest.from_dict(d, source=str(r.path))
                image_vocab = (v.image_start, v.image_end)
                break
    if image_vocab is None:
        raise CheckpointError("cross needs the image-code range: pass --vocab MANIFEST or --image-vocab START END")
    lo, hi = image_vocab
    if not 0 <= lo < hi <= parent.vocab_size:
        raise CheckpointError(f"image vocab range [{lo}, {hi}) does not fit the {parent.vocab_size}-row embedding")
    cfg = cross_of(parent, cross_every, cross_init=init, image_vocab_start=lo, image_vocab_end=hi,
                   image_parent=image_parent)
    shapes = expected_shapes(cfg)
    dtype = common_dtype(readers, opts.spec.dtype)
    vocab = load_vocab(opts.vocab, cfg=cfg, sources=readers)
    out = OutputDir(dataclasses.replace(opts.spec, dtype=dtype), cfg=cfg, shapes=shapes, vocab=vocab,
                    inputs=input_paths(readers))
    a, b = readers
    ws = Workspace()

    def cross_sources(name: str) -> list[tuple[Reader, str]]:
        return [({"llm": a, "img": b}[p.role], p.source) for p in cross_plan(name, cfg) if p.kind == "copy"]

    ahead = ReadAhead([n for n in shapes if n not in _skipped(out, True)], cross_sources)

    def produce(name: str, buf: torch.Tensor) -> torch.Tensor:
        # The output projection is the embedding by construction: written as its alias (tied=True).
        ahead.advance(name)
        return kernels.cross_into(name, buf, cfg=cfg, llm=a, img=b, seed=seed, ws=ws, scheme=init_seed_scheme)

    sources = [source_record(role, r, hash_sources=opts.hash_sources) for role, r in zip(("llm", "img"), readers)]
    asym = {} if cfg.symmetric else {"cross_pairs": [list(p) for p in cfg.cross_pairs]}
    return stream_to(out, produce, produced_dtypes=_float_dtypes(shapes, torch.float32), desc="cross",
                     progress=opts.progress, threads=opts.threads,
                     manifest_extra=_extra(opts, "cross", sources, cross_every=cross_every, init=init, seed=seed,
                                           init_seed_scheme=init_seed_scheme,
                                           image_vocab=[lo, hi], **asym),
                     tied=cfg.shared_embedding)

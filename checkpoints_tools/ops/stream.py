"""The shared streaming driver of every operation: produce each target tensor in order and write it
(``stream_to``), overlapping the parents' reads and the math of tensor k+1 with the writes of
tensor k, with the parents' coming tensors asked of the disk ahead of time (``ReadAhead``); an
atomic commit, or on any error or interrupt nothing left behind.

Throughput (issue 4: >= 0.5x a plain copy of the same bytes): parents are read straight into
reused buffers (``workspace``), writing overlaps the next tensor's read and math (two output
buffers, one writer thread per output file), a tied output projection is aliased instead of
recomputed, torch runs one thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from checkpoints_tools.io.output_dir import OutputDir
from checkpoints_tools.ops.provenance import SourceHash
from checkpoints_tools.readers import Reader
from checkpoints_tools.workspace import Workspace
from jam_metaseq.models.keys import TIED


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr (disabled when not ``enabled``)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=not enabled, leave=False)


SMALL_TENSOR = 4 << 20
"""Tensors below this many bytes (biases, norms) are streamed through their own small buffers
rather than the two reused big-tensor slots (see ``stream_to``)."""
SMALL_IN_FLIGHT = 64 << 20
"""At most this many bytes of small tensors wait for their writers at once."""


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


def float_dtypes(shapes: Mapping[str, Any], dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Every tensor of ``shapes`` produced in ``dtype`` (the fusion math's fp32)."""
    return {n: dtype for n in shapes}


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= int(s)
    return n


def upcoming_sizes(names: Sequence[str], reader: Reader, *, skip: set[str]) -> dict[str, int]:
    """name -> the largest of ``reader``'s tensors among this name and the ones after it (the
    size an input buffer still needs; ``skip``: names never read)."""
    out, most = {}, 0
    for n in reversed(list(names)):
        if n not in skip and n in reader:
            most = max(most, reader.info(n).nbytes)
        out[n] = most
    return out


def skipped_tied(out: OutputDir, tied: bool) -> set[str]:
    """The tensors a stream never reads: the output projection when ``tied`` sources are written
    into a layout that aliases it to the embedding."""
    return {TIED[1]} if tied and out.aliases_tied else set()

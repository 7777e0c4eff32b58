"""Streaming fusion kernels: JAM-Uniform / JAM-Width / JAM-Cross tensors written into reused buffers.

Paper §2.1.1-2.1.3. The math and the rules are ``jam_metaseq.fusion`` and nowhere else: these
kernels take its rule tables (``widen_blocks``, ``cross_plan``, ``fresh_rule``) and apply its
functions (``merge_tensor``, ``block_value``, ``average_pair``, ``draw_normal``) to row/element
chunks of one tensor at a time, casting each chunk straight into the output buffer, so a fused
tensor never exists in fp32 whole and nothing is allocated per tensor. What is left here is
chunking, buffer reuse and threads:

- Fresh big allocations cost more than the math itself: with the fixed 1 MiB mmap threshold
  (``ops.stream.bound_malloc``) every tensor-sized ``torch.empty`` is a new mapping whose pages fault in
  one by one (measured ~8x slower than a copy into a warm buffer). Chunk temporaries (fp32,
  ``CHUNK`` elements = 512 KiB) stay below that threshold and are recycled by malloc.
- Blocks that are a parent's values unchanged (``width.is_copy``; JAM-Cross copies) are copied in
  one pass in any dtype (exact), parents' tensors read straight into the output where they fill it.
- ``per-block`` normal draws run on ``DRAW_THREADS`` threads (torch releases the GIL), each block
  on its own generator, so the bits do not depend on the threads.

Element-wise functions are chunk-invariant and pure copies exact in any dtype (fp16/bf16 -> fp32 is
exact), so each kernel equals its ``jam_metaseq.fusion`` function bit for bit;
``tests/test_ckpt_kernels.py`` checks that on every tensor of tiny models.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Callable, Sequence

import torch

from checkpoints_tools.workspace import Workspace
from jam_metaseq.fusion import average_pair, block_value, cross_plan, draw_normal, fresh_rule, fresh_tensor, merge_tensor
from jam_metaseq.fusion import cross as fusion_cross
from jam_metaseq.fusion.cross import DEFAULT_INIT_SEED_SCHEME, check_scheme
from jam_metaseq.models.keys import VERSION_VALUE
from jam_metaseq.fusion.width import is_copy, widen_blocks
from jam_metaseq.models.config import CrossConfig, DecoderConfig

CHUNK = 1 << 17
"""Elements per chunk of the fp32 math (512 KiB fp32: malloc-heap sized, cache friendly)."""
DRAW_THREADS = 2
"""Threads drawing the blocks of a ``per-block`` normal init (1 = on the caller's thread)."""


def map_chunks(out: torch.Tensor, inputs: Sequence[torch.Tensor],
               fn: Callable[[list[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    """``out = fn(inputs)`` for an element-wise ``fn``, ``CHUNK`` elements at a time (all contiguous,
    one shape); each chunk's result is cast into ``out``."""
    flat_out = out.view(-1)
    flats = [x.reshape(-1) for x in inputs]
    n = flat_out.numel()
    for i in range(0, n, CHUNK):
        j = min(n, i + CHUNK)
        flat_out[i:j].copy_(fn([x[i:j] for x in flats]))
    return out


def map_rows(out: torch.Tensor, inputs: Sequence[torch.Tensor],
             fn: Callable[[list[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    """``out = fn(inputs)`` for a row-wise ``fn`` on (possibly strided) blocks of one shape, about
    ``CHUNK`` elements of rows at a time."""
    if out.dim() == 0:
        return out.copy_(fn(list(inputs)))
    per_row = max(1, out[0].numel()) if out.dim() > 1 else 1
    rows = max(1, CHUNK // per_row)
    for i in range(0, out.shape[0], rows):
        j = min(out.shape[0], i + rows)
        out[i:j].copy_(fn([x[i:j] for x in inputs]))
    return out


# ---- JAM-Uniform -------------------------------------------------------------------------------


def merge_into(name: str, inputs: Sequence[torch.Tensor], out: torch.Tensor, *,
               weights: Sequence[float]) -> torch.Tensor:
    """``fusion.merge_tensor`` (fp32 weighted sum), chunk by chunk, cast into ``out``."""
    for i, t in enumerate(inputs):
        if t.shape != out.shape:
            raise ValueError(f"{name}: parent {i} has shape {tuple(t.shape)}, expected {tuple(out.shape)}")
    return map_chunks(out, inputs, lambda cs: merge_tensor(name, cs, weights=list(weights)))


# ---- JAM-Width ---------------------------------------------------------------------------------


def widen_into(name: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, parent: DecoderConfig,
               init: str = "copy") -> torch.Tensor:
    """``fusion.widen_tensor`` into ``out``: each of ``fusion.widen_blocks`` filled with
    ``fusion.block_value`` a few rows at a time (a parent's own rows: one copy)."""
    if a.shape != b.shape:
        raise ValueError(f"{name}: LLM parent has shape {tuple(a.shape)}, image parent {tuple(b.shape)}")
    for blk in widen_blocks(name, tuple(a.shape), parent=parent, init=init):
        dst = out[blk.out_rows] if blk.out_cols is None else out[blk.out_rows, blk.out_cols]
        sa, sb = a[blk.src_rows], b[blk.src_rows]
        if is_copy(blk.what):
            dst.copy_(sa if blk.what == "llm" else sb)
        else:
            map_rows(dst, [sa, sb], lambda cs, what=blk.what: block_value(what, cs[0], cs[1]))
    return out


# ---- JAM-Cross ---------------------------------------------------------------------------------


_LOCAL = threading.local()
_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _draw_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=DRAW_THREADS, thread_name_prefix="jam-ckpt-draw")
        return _POOL


def _draw_range(name: str, numel: int, flat_out: torch.Tensor, start: int, stop: int, *, cfg: CrossConfig,
                seed: int, scheme: str) -> None:
    ws = getattr(_LOCAL, "ws", None)
    if ws is None:
        ws = _LOCAL.ws = Workspace()
    buf = ws.get("draw", (stop - start,), torch.float32)
    flat_out[start:stop].copy_(draw_normal(name, numel, buf, cfg=cfg, seed=seed, scheme=scheme, start=start))


def _fresh_into(name: str, out: torch.Tensor, *, cfg: CrossConfig, seed: int, scheme: str,
                ws: Workspace) -> torch.Tensor:
    """``fusion.fresh_tensor`` into ``out``. Normal draws go through reused fp32 buffers:
    ``per-tensor`` one tensor-sized buffer (one stream), ``per-block`` one ``DRAW_BLOCK`` buffer
    per drawing thread, blocks spread over ``DRAW_THREADS``; the other inits (zeros, ones, the
    preserve identities) are exact in any dtype and written directly."""
    check_scheme(scheme)
    if fresh_rule(name, cfg) != "normal":
        return out.copy_(fresh_tensor(name, tuple(out.shape), cfg=cfg, seed=seed, scheme=scheme))
    numel = out.numel()
    if scheme == "per-tensor":
        buf = ws.get("fresh", out.shape, torch.float32)
        return out.copy_(draw_normal(name, numel, buf, cfg=cfg, seed=seed, scheme=scheme))
    flat = out.view(-1)
    block = fusion_cross.DRAW_BLOCK
    ranges = [(s, min(numel, s + block)) for s in range(0, numel, block)]
    if DRAW_THREADS <= 1 or len(ranges) == 1:
        for s, e in ranges:
            _draw_range(name, numel, flat, s, e, cfg=cfg, seed=seed, scheme=scheme)
        return out
    pool = _draw_pool()
    futs = [pool.submit(_draw_range, name, numel, flat, s, e, cfg=cfg, seed=seed, scheme=scheme) for s, e in ranges]
    for f in futs:
        f.result()
    return out


def cross_into(name: str, out: torch.Tensor, *, cfg: CrossConfig, llm: Any, img: Any, seed: int,
               ws: Workspace, scheme: str = DEFAULT_INIT_SEED_SCHEME) -> torch.Tensor:
    """``fusion.cross_tensor`` into ``out``, piece by piece of ``fusion.cross_plan``. ``llm``/``img``
    are readers (``get``, ``get_into``, ``info``): a copy that fills ``out`` is read straight into
    it (a cast is exact), a copy of some rows (the image rows of the shared embedding) goes
    through ``ws``; averages (the final LayerNorm) are small; fresh tensors: ``_fresh_into``."""
    readers = {"llm": llm, "img": img}
    for p in cross_plan(name, cfg):
        dst = fusion_cross.target(out, p)
        if p.kind == "copy":
            r = readers[p.role]
            if p.rows == slice(None) and p.cols == slice(None):
                r.get_into(p.source, dst)
            else:
                info = r.info(p.source)
                dst.copy_(r.get_into(p.source, ws.get(f"{p.role}_rows", info.shape, info.dtype))[p.rows])
        elif p.kind == "average":
            dst.copy_(average_pair(llm.get(p.source)[p.rows], img.get(p.source)[p.rows]))
        elif p.kind == "zeros":
            dst.zero_()
        elif p.kind == "const":
            dst.fill_(VERSION_VALUE)
        else:
            _fresh_into(name, dst, cfg=cfg, seed=seed, scheme=scheme, ws=ws)
    return out

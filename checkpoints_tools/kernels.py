"""Streaming fusion kernels: JAM-Uniform / JAM-Width / JAM-Cross tensors written into reused buffers.

Paper §2.1.1-2.1.3. The math is ``jam_metaseq.fusion`` (fp32 accumulation): these kernels apply
it to row/element chunks of one tensor at a time and cast each chunk straight into the output
buffer, so a fused tensor never exists in fp32 whole and nothing is allocated per tensor. Fresh
big allocations cost more than the math itself here: with the fixed 1 MiB mmap threshold
(``ops.bound_malloc``) every tensor-sized ``torch.empty`` is a new mapping whose pages fault in
one by one (measured ~8x slower than a copy into a warm buffer). Chunk temporaries (fp32,
``CHUNK`` elements = 512 KiB) stay below that threshold and are recycled by malloc.

Each kernel reproduces its ``jam_metaseq.fusion`` function bit for bit (element-wise ops are
chunk-invariant, pure copies are exact in any dtype: fp16/bf16 -> fp32 is exact);
``tests/test_ckpt_kernels.py`` checks that on every tensor of tiny models.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import torch

from checkpoints_tools.workspace import Workspace
from jam_metaseq.fusion import cross_tensor, fresh_tensor, merge_tensor, widen_matrix
from jam_metaseq.fusion.cross import tensor_seed
from jam_metaseq.models.config import CrossConfig, DecoderConfig

CHUNK = 1 << 17
"""Elements per chunk of the fp32 math (512 KiB fp32: malloc-heap sized, cache friendly)."""

# Same dispatch as jam_metaseq.fusion.width.widen_tensor.
_EMBEDDINGS = re.compile(r"^decoder\.(embed_tokens|embed_positions|output_projection)\.weight$")
_QKV = re.compile(r"^decoder\.layers\.\d+\.self_attn\.qkv_proj\.(weight|bias)$")
# Same dispatch as jam_metaseq.fusion.cross.cross_tensor.
_BRANCH = re.compile(r"^decoder\.layers_(llm|cm3)\.(\d+)\.(.+)$")
_XATTN = re.compile(r"^decoder\.x_attn_layers_(llm|cm3)\.(\d+)\.(.+)$")

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


# ---- JAM-Uniform -------------------------------------------------------------------------------


def merge_into(name: str, inputs: Sequence[torch.Tensor], out: torch.Tensor, *,
               weights: Sequence[float]) -> torch.Tensor:
    """``fusion.merge_tensor`` (fp32 weighted sum), chunk by chunk, cast into ``out``."""
    for i, t in enumerate(inputs):
        if t.shape != out.shape:
            raise ValueError(f"{name}: parent {i} has shape {tuple(t.shape)}, expected {tuple(out.shape)}")
    return map_chunks(out, inputs, lambda cs: merge_tensor(name, cs, weights=list(weights)))


# ---- JAM-Width ---------------------------------------------------------------------------------


def _widen_matrix_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, init: str) -> None:
    """``fusion.widen_matrix`` (out x in -> 2out x 2in) into ``out``. ``copy`` moves bytes (exact in
    any dtype); ``average`` runs ``widen_matrix`` in fp32 on row blocks: rows [i, j) of both
    parents give rows [i, j) of the top half and [R+i, R+j) of the bottom half."""
    R, C = a.shape
    if init == "copy":
        out[:R, :C].copy_(a)
        out[:R, C:].copy_(a)
        out[R:, :C].copy_(b)
        out[R:, C:].copy_(b)
        return
    rows = max(1, CHUNK // max(C, 1))
    for i in range(0, R, rows):
        j = min(R, i + rows)
        w = widen_matrix(a[i:j].to(torch.float32), b[i:j].to(torch.float32), init=init)
        out[i:j].copy_(w[: j - i])
        out[R + i:R + j].copy_(w[j - i:])


def widen_into(name: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, parent: DecoderConfig,
               init: str = "copy") -> torch.Tensor:
    """``fusion.widen_tensor`` into ``out`` (same dispatch: version, embeddings, qkv per K/V/Q
    block, vectors, matrices)."""
    if a.shape != b.shape:
        raise ValueError(f"{name}: LLM parent has shape {tuple(a.shape)}, image parent {tuple(b.shape)}")
    if init not in ("copy", "average"):
        raise ValueError(f"init must be one of ('copy', 'average'), got {init!r}")
    if name.endswith("version"):
        out.copy_(a)
    elif _EMBEDDINGS.match(name):
        E = a.shape[1]
        out[:, :E].copy_(a)
        out[:, E:].copy_(b)
    elif _QKV.match(name):
        E = parent.embed_dim
        for k in range(3):  # K, V, Q: each widened on its own so heads stay whole
            la, lb, o = a[k * E:(k + 1) * E], b[k * E:(k + 1) * E], out[2 * k * E:2 * (k + 1) * E]
            if a.dim() == 2:
                _widen_matrix_into(la, lb, o, init=init)
            else:
                o[:E].copy_(la)
                o[E:].copy_(lb)
    elif a.dim() == 1:
        out[:a.shape[0]].copy_(a)
        out[a.shape[0]:].copy_(b)
    elif a.dim() == 2:
        _widen_matrix_into(a, b, out, init=init)
    else:
        raise ValueError(f"{name}: do not know how to widen a tensor of shape {tuple(a.shape)}")
    return out


# ---- JAM-Cross ---------------------------------------------------------------------------------


def _is_random_init(name: str, cfg: CrossConfig) -> bool:
    """The new tensors ``fusion.fresh_tensor`` draws from N(0, init_std) (the rest are zeros,
    ones or the preserve identities: small or cheap, left to ``fresh_tensor`` itself)."""
    if name.endswith("bias") or "layer_norm" in name:
        return False
    if cfg.cross_init == "preserve" and (name == "decoder.feature_projection.weight"
                                         or name.endswith("cross_attn.out_proj.weight")
                                         or name.endswith("fc2.weight")):
        return False
    return True


def _fresh_into(name: str, out: torch.Tensor, *, cfg: CrossConfig, seed: int, ws: Workspace) -> torch.Tensor:
    """``fusion.fresh_tensor`` into ``out``: the random draws go into a reused fp32 buffer (the
    same generator, seed and kernel as ``fresh_tensor``'s ``randn(...) * init_std``: the same bits)
    instead of two fresh tensor-sized allocations."""
    if not _is_random_init(name, cfg):
        return out.copy_(fresh_tensor(name, tuple(out.shape), cfg=cfg, seed=seed))
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    buf = ws.get("fresh", out.shape, torch.float32)
    torch.randn(tuple(out.shape), generator=g, out=buf)
    return out.copy_(buf.mul_(cfg.parent.init_std))


def cross_into(name: str, out: torch.Tensor, *, cfg: CrossConfig, llm: Any, img: Any, seed: int,
               ws: Workspace) -> torch.Tensor:
    """``fusion.cross_tensor`` into ``out``. ``llm``/``img`` are readers (``get``, ``get_into``,
    ``info``). Branch tensors and position embeddings are read straight into ``out`` (a cast is
    exact); the shared embedding takes the image parent's rows [image_vocab_start,
    image_vocab_end) through ``ws``; new tensors come from ``fusion.fresh_tensor`` (seeded by
    name, so order-free); the rest (version, final LayerNorm) is small: ``cross_tensor`` itself."""
    if name in ("decoder.embed_tokens.weight", "decoder.output_projection.weight"):
        lo, hi = cfg.image_vocab_start, cfg.image_vocab_end
        if 0 <= lo < hi <= cfg.vocab_size:
            src = "decoder.embed_tokens.weight"
            llm.get_into(src, out)
            tmp = img.get_into(src, ws.get("img_embed", img.info(src).shape, img.info(src).dtype))
            out[lo:hi].copy_(tmp[lo:hi])
            return out
    elif name == "decoder.embed_positions_llm.weight":
        return llm.get_into("decoder.embed_positions.weight", out)
    elif name == "decoder.embed_positions_cm3.weight":
        return img.get_into("decoder.embed_positions.weight", out)
    elif (m := _BRANCH.match(name)) is not None:
        branch, i, rest = m.groups()
        return (llm if branch == "llm" else img).get_into(f"decoder.layers.{i}.{rest}", out)
    elif _XATTN.match(name) or name == "decoder.feature_projection.weight":
        return _fresh_into(name, out, cfg=cfg, seed=seed, ws=ws)
    return out.copy_(cross_tensor(name, cfg=cfg, llm=llm.get, img=img.get, seed=seed))

"""JAM-Width (paper §2.1.2, Eq. 2-3): a decoder twice as wide, initialised block-wise from both parents.

Every matrix W (out x in) becomes [[W_llm, X_llm], [W_img, X_img]] with X = the same parent's W
(``init="copy"``, Eq. 2) or the parents' average (``init="average"``, Eq. 3). The fused qkv projection is
widened per K/V/Q block so that the new heads are whole (heads 0..H-1 from the LLM, H..2H-1 from the
image model, head dim kept). Token/position embeddings are concatenated on the hidden dim [llm | img];
vectors (biases, affine LayerNorm) are concatenated [llm; img] (per K/V/Q block for the qkv bias).
"""

from __future__ import annotations

import re

import torch

from ..models.config import DecoderConfig

WIDEN_INITS = ("copy", "average")
_EMBEDDINGS = re.compile(r"^decoder\.(embed_tokens|embed_positions|output_projection)\.weight$")
_QKV = re.compile(r"^decoder\.layers\.\d+\.self_attn\.qkv_proj\.(weight|bias)$")


def widen_matrix(llm: torch.Tensor, img: torch.Tensor, *, init: str) -> torch.Tensor:
    """(out, in) x 2 -> (2 out, 2 in): [[W_llm, X_llm], [W_img, X_img]] (Eq. 2 / Eq. 3)."""
    if init == "copy":
        x_llm, x_img = llm, img
    elif init == "average":
        x_llm = x_img = (llm + img) / 2
    else:
        raise ValueError(f"init must be one of {WIDEN_INITS}, got {init!r}")
    return torch.cat([torch.cat([llm, x_llm], dim=1), torch.cat([img, x_img], dim=1)], dim=0)


def widen_tensor(
    name: str, llm: torch.Tensor, img: torch.Tensor, *, parent: DecoderConfig, init: str = "copy"
) -> torch.Tensor:
    """One parent tensor pair -> the JAM-Width tensor of the same name (fp32)."""
    if llm.shape != img.shape:
        raise ValueError(f"{name}: LLM parent has shape {tuple(llm.shape)}, image parent {tuple(img.shape)}")
    if init not in WIDEN_INITS:
        raise ValueError(f"init must be one of {WIDEN_INITS}, got {init!r}")
    llm, img = llm.to(torch.float32), img.to(torch.float32)
    if name.endswith("version"):
        return llm.clone()
    if _EMBEDDINGS.match(name):
        return torch.cat([llm, img], dim=1)  # (rows, 2E)
    if _QKV.match(name):
        E = parent.embed_dim
        blocks = []
        for b in range(3):  # K, V, Q: each widened on its own so heads stay whole
            l_blk, i_blk = llm[b * E : (b + 1) * E], img[b * E : (b + 1) * E]
            blocks.append(widen_matrix(l_blk, i_blk, init=init) if llm.dim() == 2 else torch.cat([l_blk, i_blk]))
        return torch.cat(blocks, dim=0)
    if llm.dim() == 1:
        return torch.cat([llm, img])
    if llm.dim() == 2:
        return widen_matrix(llm, img, init=init)
    raise ValueError(f"{name}: do not know how to widen a tensor of shape {tuple(llm.shape)}")

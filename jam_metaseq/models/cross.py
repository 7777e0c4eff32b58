"""JAM-Cross (paper §2.1.3, Eq. 4-5, Fig. 2): two parent decoders side by side with bidirectional
cross-attention blocks.

Layout follows the authors' metaseq prototype: a shared token embedding (tied to the output
projection), one learned position table per branch, branch layers ``layers_llm`` / ``layers_cm3``, and
after every ``cross_every``-th layer (after layers 0, k, 2k, ...) a pair of cross blocks
``x_attn_layers_llm`` (queries from the LLM branch, keys/values from the image branch) and
``x_attn_layers_cm3`` (the reverse). Both blocks of a pair read the other branch's output of the same
layer, from before either cross block (Eq. 4). Cross-attention is causal: position t sees the other
branch's positions <= t, so the model stays autoregressive. The final states are concatenated as
``cat([x_cm3, x_llm])``, projected by ``feature_projection`` (E x 2E, no bias), normalised by the
final LayerNorm and scored with the shared output projection.
"""

from __future__ import annotations

import torch
from torch import nn

from . import keys
from .cache import KVCache
from .config import CrossConfig, DecoderConfig
from .decoder import (
    Attention, AttentionContext, DecoderLayer, PreLNBlock, build_context, embed_input, fresh_buffer,
    init_parameters_, layer_norm,
)


class CrossAttention(Attention):
    """Eq. 4-5: Q from this branch, K and V from the other branch (separate projections)."""

    def __init__(self, cfg: DecoderConfig, slot: int) -> None:
        super().__init__(cfg, slot)
        E = cfg.embed_dim
        self.q_proj = nn.Linear(E, E, bias=cfg.bias)
        self.k_proj = nn.Linear(E, E, bias=cfg.bias)
        self.v_proj = nn.Linear(E, E, bias=cfg.bias)
        self.out_proj = nn.Linear(E, E, bias=cfg.bias)

    def forward(self, x: torch.Tensor, other: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return self.attend_and_project(self.q_proj(x), self.k_proj(other), self.v_proj(other), ctx)


class CrossBlock(PreLNBlock):
    """A pre-LN layer whose self-attention is replaced by cross-attention, with its own FFN."""

    def __init__(self, cfg: DecoderConfig, slot: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.cross_attn = CrossAttention(cfg, slot)
        self.cross_attn_layer_norm = layer_norm(cfg.embed_dim, cfg)
        self.add_ffn(cfg)

    def forward(self, x: torch.Tensor, other: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return self.residual_and_ffn(x, self.cross_attn(self.cross_attn_layer_norm(x), other, ctx))


class CrossDecoder(nn.Module):
    """The ``decoder.*`` submodule of JAM-Cross."""

    def __init__(self, cfg: CrossConfig) -> None:
        super().__init__()
        p = cfg.parent
        self.cfg = cfg
        L = p.layers
        self.register_buffer("version", fresh_buffer(keys.VERSION))
        self.embed_tokens = nn.Embedding(p.vocab_size, p.embed_dim, padding_idx=p.padding_idx)
        self.embed_positions_llm = nn.Embedding(p.num_position_rows, p.embed_dim)
        self.embed_positions_cm3 = nn.Embedding(p.num_position_rows, p.embed_dim)
        # Cache slots: [0, L) LLM self-attn, [L, 2L) image self-attn, then the cross blocks.
        self.layers_llm = nn.ModuleList(DecoderLayer(p, slot=i) for i in range(L))
        self.layers_cm3 = nn.ModuleList(DecoderLayer(p, slot=L + i) for i in range(L))
        n_cross = len(cfg.cross_after)
        self.x_attn_layers_llm = nn.ModuleList(CrossBlock(p, slot=2 * L + j) for j in range(n_cross))
        self.x_attn_layers_cm3 = nn.ModuleList(
            CrossBlock(p, slot=2 * L + n_cross + j) for j in range(n_cross)
        )
        self.feature_projection = nn.Linear(2 * p.embed_dim, p.embed_dim, bias=False)
        self.layer_norm = layer_norm(p.embed_dim, p)
        self.output_projection = nn.Linear(p.embed_dim, p.vocab_size, bias=False)
        self.output_projection.weight = self.embed_tokens.weight
        self.embed_scale = p.embed_dim**0.5 if p.scale_embedding else 1.0
        self.cross_index = {layer: j for j, layer in enumerate(cfg.cross_after)}

    def embed(
        self, tokens: torch.Tensor, cache: KVCache | None, *, check_positions: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) -> (x_llm, x_cm3): one shared token lookup, each branch's own positions."""
        x_llm, x_cm3 = embed_input(
            self, tokens, positions_tables=[self.embed_positions_llm, self.embed_positions_cm3],
            cfg=self.cfg.parent, cache=cache, check_positions=check_positions,
        )
        return x_llm, x_cm3


class JamCrossLM(nn.Module):
    """JAM-Cross LM; ``state_dict()`` keys follow the prototype (``decoder.layers_llm.*`` ...)."""

    def __init__(self, cfg: CrossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = CrossDecoder(cfg)
        init_parameters_(self, cfg)  # with ``preserve``, the cross blocks start as identities

    @property
    def num_attention_slots(self) -> int:
        return 2 * self.cfg.parent.layers + 2 * len(self.cfg.cross_after)

    def setup_caches(
        self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        p = self.decoder.embed_tokens.weight
        return KVCache(
            num_slots=self.num_attention_slots, batch_size=batch_size, heads=self.cfg.parent.heads,
            head_dim=self.cfg.parent.head_dim, max_len=max_len, dtype=dtype or p.dtype,
            device=device or p.device,
        )

    def branch_features(
        self, tokens: torch.Tensor, *, cache: KVCache | None = None, span: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) -> final (x_llm, x_cm3), each (B, T, E), before projection and final LayerNorm.

        ``span``: a static step (``decoder.build_static_context``); one context serves both branches'
        self-attention and both cross directions, whose keys sit in their own cache slots."""
        d = self.decoder
        pad_idx = self.cfg.parent.padding_idx
        ctx = build_context(tokens, padding_idx=pad_idx, cache=cache, span=span)
        x_llm, x_cm3 = d.embed(tokens, cache, check_positions=span is None)
        for i, (layer_llm, layer_cm3) in enumerate(zip(d.layers_llm, d.layers_cm3)):
            x_llm = layer_llm(x_llm, ctx)
            x_cm3 = layer_cm3(x_cm3, ctx)
            j = d.cross_index.get(i)
            if j is not None:
                # Both directions read the other branch's output of layer i (Eq. 4).
                x_llm, x_cm3 = (
                    d.x_attn_layers_llm[j](x_llm, x_cm3, ctx),
                    d.x_attn_layers_cm3[j](x_cm3, x_llm, ctx),
                )
        if cache is not None:
            cache.advance(tokens.ne(pad_idx).sum(dim=1), tokens.shape[1])
        return x_llm, x_cm3

    def extract_features(
        self, tokens: torch.Tensor, *, cache: KVCache | None = None, span: int | None = None
    ) -> torch.Tensor:
        x_llm, x_cm3 = self.branch_features(tokens, cache=cache, span=span)
        x = self.decoder.feature_projection(torch.cat([x_cm3, x_llm], dim=-1))  # (B, T, E)
        return self.decoder.layer_norm(x)

    def output_layer(self, features: torch.Tensor) -> torch.Tensor:
        return self.decoder.output_projection(features)

    def forward(
        self, tokens: torch.Tensor, *, cache: KVCache | None = None, span: int | None = None
    ) -> torch.Tensor:
        return self.output_layer(self.extract_features(tokens, cache=cache, span=span))

"""JAM-Cross (paper §2.1.3, Eq. 4-5, Fig. 2): two parent decoders side by side with bidirectional
cross-attention blocks.

Layout follows the authors' metaseq prototype: a shared token embedding (tied to the output
projection), one learned position table per branch, branch layers ``layers_llm`` / ``layers_cm3``, and
after every ``cross_every``-th layer (after layers 0, k, 2k, ...) a pair of cross blocks
``x_attn_layers_llm`` (queries from the LLM branch, keys/values from the image branch) and
``x_attn_layers_cm3`` (the reverse). Both blocks of a pair read the other branch's output of the same
layer, from before either cross block (Eq. 4).

Parents of different sizes (``CrossConfig.image_parent``): each branch keeps its parent's shape,
cross blocks are rectangular (K/V projected from the other branch's width), pairs are aligned by
proportional depth (``CrossConfig.cross_pairs``), and with different widths each branch has its
own input embedding and the output projection, at the wider width, is untied (``CrossConfig``
says why). Cross-attention is causal: position t sees the other
branch's positions <= t, so the model stays autoregressive. The final states are concatenated as
``cat([x_img, x_llm])``, projected by ``feature_projection`` (E x 2E, no bias), normalised by the
final LayerNorm and scored with the shared output projection.

Parents of the Llama family: each branch is its parent's block (RMSNorm, rotary positions, gated
MLP, grouped k/v heads, ``DecoderConfig``'s named fields) and the branches hold no position
tables. A cross block is built from its own branch's config: its norms, FFN kind, heads, k/v
heads and head width are that branch's, and with rotary positions RoPE turns its queries and the
other branch's keys by their common token positions (the streams are aligned token for token), so
cross-attention sees relative positions as the branch's self-attention does. The final norm after
the feature projection is the LLM's kind. Parents with untied output projections (Llama-3) give
JAM-Cross an output projection of its own (``CrossConfig.tied_output``).
"""

from __future__ import annotations

import torch
from torch import nn

from . import keys
from .cache import KVCache
from .config import CrossConfig, DecoderConfig
from .decoder import (
    Attention, AttentionContext, DecoderLayer, PreLNBlock, build_context, embed_input, fresh_buffer,
    init_parameters_, make_norm, rotary_context,
)


class CrossAttention(Attention):
    """Eq. 4-5: Q from this branch, K and V from the other branch (separate projections).

    Rectangular when the branches differ in width: ``k_proj`` / ``v_proj`` map the other
    branch's width ``other_dim`` to this branch's heads; heads, k/v heads and head dim are this
    branch's (q: (H D, E), k and v: (G D, E_other), out: (E, H D))."""

    def __init__(self, cfg: DecoderConfig, slot: int, *, other_dim: int | None = None) -> None:
        super().__init__(cfg, slot)
        E, O = cfg.embed_dim, other_dim or cfg.embed_dim
        q_dim, kv_dim = cfg.heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(E, q_dim, bias=cfg.has_qkv_bias)
        self.k_proj = nn.Linear(O, kv_dim, bias=cfg.has_qkv_bias)
        self.v_proj = nn.Linear(O, kv_dim, bias=cfg.has_qkv_bias)
        self.out_proj = nn.Linear(q_dim, E, bias=cfg.bias)

    def forward(self, x: torch.Tensor, other: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return self.attend_and_project(self.q_proj(x), self.k_proj(other), self.v_proj(other), ctx)


class CrossBlock(PreLNBlock):
    """A pre-LN layer whose self-attention is replaced by cross-attention, with its own FFN
    (shaped like its own branch ``cfg``; keys and values from a branch of width ``other_dim``)."""

    def __init__(self, cfg: DecoderConfig, slot: int, *, other_dim: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.cross_attn = CrossAttention(cfg, slot, other_dim=other_dim)
        self.cross_attn_layer_norm = make_norm(cfg.embed_dim, cfg)
        self.add_ffn(cfg)

    def forward(self, x: torch.Tensor, other: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return self.residual_and_ffn(x, self.cross_attn(self.cross_attn_layer_norm(x), other, ctx))


class CrossDecoder(nn.Module):
    """The ``decoder.*`` submodule of JAM-Cross (modules registered in the key schema's order)."""

    def __init__(self, cfg: CrossConfig) -> None:
        super().__init__()
        a, b, p = cfg.llm, cfg.img, cfg.parent
        self.cfg = cfg
        W = cfg.output_dim
        self.register_buffer("version", fresh_buffer(keys.VERSION))
        if cfg.shared_embedding:
            self.embed_tokens = nn.Embedding(p.vocab_size, p.embed_dim, padding_idx=p.padding_idx)
        else:  # one input embedding per branch width; the output projection is its own tensor
            self.embed_tokens_llm = nn.Embedding(p.vocab_size, a.embed_dim, padding_idx=p.padding_idx)
            self.embed_tokens_cm3 = nn.Embedding(p.vocab_size, b.embed_dim, padding_idx=p.padding_idx)
        if p.learned_positions:
            self.embed_positions_llm = nn.Embedding(a.num_position_rows, a.embed_dim)
            self.embed_positions_cm3 = nn.Embedding(b.num_position_rows, b.embed_dim)
        # Cache slots: LLM self-attn, image self-attn, then the cross blocks (LLM side, image side).
        La, Lb = a.layers, b.layers
        n_cross = len(cfg.cross_after)
        self.layers_llm = nn.ModuleList(DecoderLayer(a, slot=i) for i in range(La))
        self.layers_cm3 = nn.ModuleList(DecoderLayer(b, slot=La + i) for i in range(Lb))
        self.x_attn_layers_llm = nn.ModuleList(
            CrossBlock(a, slot=La + Lb + j, other_dim=b.embed_dim) for j in range(n_cross))
        self.x_attn_layers_cm3 = nn.ModuleList(
            CrossBlock(b, slot=La + Lb + n_cross + j, other_dim=a.embed_dim) for j in range(n_cross))
        self.feature_projection = nn.Linear(b.embed_dim + a.embed_dim, W, bias=False)
        self.layer_norm = make_norm(W, p)
        self.output_projection = nn.Linear(W, p.vocab_size, bias=False)
        if cfg.tied_output:
            self.output_projection.weight = self.embed_tokens.weight
        self.embed_scale = a.embed_dim**0.5 if p.scale_embedding else 1.0
        self.embed_scale_img = b.embed_dim**0.5 if p.scale_embedding else 1.0
        self.cross_pairs = cfg.cross_pairs

    def embed(
        self, tokens: torch.Tensor, cache: KVCache | None, *, check_positions: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) -> (x_llm, x_img): one shared token lookup (or each branch's own, when the
        widths differ), each branch's own positions."""
        pos_llm, pos_img = getattr(self, "embed_positions_llm", None), getattr(self, "embed_positions_cm3", None)
        if self.cfg.shared_embedding:
            x_llm, x_img = embed_input(
                self, tokens, positions_tables=[pos_llm, pos_img],
                cfg=self.cfg.parent, cache=cache, check_positions=check_positions,
            )
            return x_llm, x_img
        out = []
        for table, pos, scale in ((self.embed_tokens_llm, pos_llm, self.embed_scale),
                                  (self.embed_tokens_cm3, pos_img, self.embed_scale_img)):
            out += embed_input(self, tokens, positions_tables=[pos], cfg=self.cfg.parent, cache=cache,
                               check_positions=check_positions, token_table=table, scale=scale)
        return out[0], out[1]


class JamCrossLM(nn.Module):
    """JAM-Cross LM; ``state_dict()`` keys follow the prototype (``decoder.layers_llm.*`` ...)."""

    def __init__(self, cfg: CrossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = CrossDecoder(cfg)
        init_parameters_(self, cfg)  # with ``preserve``, the cross blocks start as identities

    @property
    def num_attention_slots(self) -> int:
        return self.cfg.llm.layers + self.cfg.img.layers + 2 * len(self.cfg.cross_after)

    def slot_shapes(self) -> list[tuple[int, int]]:
        """(k/v heads, head dim) of every cache slot: a branch's self-attention and the cross blocks
        whose queries come from it have that branch's."""
        a, b, n = self.cfg.llm, self.cfg.img, len(self.cfg.cross_after)
        sa, sb = (a.num_kv_heads, a.head_dim), (b.num_kv_heads, b.head_dim)
        return [sa] * a.layers + [sb] * b.layers + [sa] * n + [sb] * n

    def setup_caches(
        self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        p = next(self.parameters())
        shapes = self.slot_shapes()
        return KVCache(
            num_slots=len(shapes), batch_size=batch_size, heads=shapes[0][0], head_dim=shapes[0][1],
            max_len=max_len, dtype=dtype or p.dtype, device=device or p.device,
            slot_shapes=None if self.cfg.symmetric else shapes,
        )

    def branch_features(
        self, tokens: torch.Tensor, *, cache: KVCache | None = None, span: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) -> final (x_llm, x_img), (B, T, E_llm) and (B, T, E_img), before projection and
        final LayerNorm.

        Each branch runs its layers up to the next cross pair ``(i, j)`` (LLM layer i, image layer
        j: ``CrossConfig.cross_pairs``), then both directions read the other branch's output of
        its pair layer (Eq. 4); the layers after the last pair follow.

        ``span``: a static step (``decoder.build_static_context``); one context serves both branches'
        self-attention and both cross directions, whose keys sit in their own cache slots."""
        d = self.decoder
        pad_idx = self.cfg.parent.padding_idx
        ctx = build_context(tokens, padding_idx=pad_idx, cache=cache, span=span)
        x_llm, x_img = d.embed(tokens, cache, check_positions=span is None)
        # Each branch's rotary tables (its own rope settings) on the shared mask and cache.
        ctx_llm = rotary_context(ctx, tokens, cfg=self.cfg.llm, cache=cache, dtype=x_llm.dtype, check=span is None)
        ctx_img = ctx_llm if self.cfg.symmetric else rotary_context(
            ctx, tokens, cfg=self.cfg.img, cache=cache, dtype=x_img.dtype, check=False)
        done_llm = done_img = 0
        for c, (i, j) in enumerate(d.cross_pairs):
            for layer in d.layers_llm[done_llm:i + 1]:
                x_llm = layer(x_llm, ctx_llm)
            for layer in d.layers_cm3[done_img:j + 1]:
                x_img = layer(x_img, ctx_img)
            done_llm, done_img = i + 1, j + 1
            # Both directions read the other branch's output of the paired layer (Eq. 4).
            x_llm, x_img = (
                d.x_attn_layers_llm[c](x_llm, x_img, ctx_llm),
                d.x_attn_layers_cm3[c](x_img, x_llm, ctx_img),
            )
        for layer in d.layers_llm[done_llm:]:
            x_llm = layer(x_llm, ctx_llm)
        for layer in d.layers_cm3[done_img:]:
            x_img = layer(x_img, ctx_img)
        if cache is not None:
            cache.advance(tokens.ne(pad_idx).sum(dim=1), tokens.shape[1])
        return x_llm, x_img

    def extract_features(
        self, tokens: torch.Tensor, *, cache: KVCache | None = None, span: int | None = None
    ) -> torch.Tensor:
        x_llm, x_img = self.branch_features(tokens, cache=cache, span=span)
        x = self.decoder.feature_projection(torch.cat([x_img, x_llm], dim=-1))  # (B, T, W)
        return self.decoder.layer_norm(x)

    def output_layer(self, features: torch.Tensor) -> torch.Tensor:
        return self.decoder.output_projection(features)

    def forward(
        self, tokens: torch.Tensor, *, cache: KVCache | None = None, span: int | None = None
    ) -> torch.Tensor:
        return self.output_layer(self.extract_features(tokens, cache=cache, span=span))

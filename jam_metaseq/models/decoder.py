"""The parent decoder: metaseq's ``model_parallel_transformer_lm`` at model-parallel size 1, and the
same block with the Llama family's parts.

OPT / CM3leon family (paper §3.1): pre-LayerNorm layers, learned positions offset by
``padding_idx + 1``, token embedding scaled by sqrt(E) unless ``scale_embedding=False``, output
projection tied to the token embedding. State-dict keys and shapes are exactly metaseq's (the fused
``qkv_proj`` stacks rows as [K; V; Q]), so the ``model`` dict of a metaseq checkpoint loads with
``strict=True``. JAM-Uniform (Eq. 1) and JAM-Width (Eq. 2-3) are this module with a parent-shaped
or twice-as-wide ``DecoderConfig``.

The Llama family (Llama, Qwen2, Gemma) is the same block with other values of the config's named
fields, never another class: ``norm`` (RMSNorm, Gemma's (1 + w) form), ``positions="rotary"``
(RoPE on q and k per head in HF's half-split layout: dims [0, D/2) pair with [D/2, D), so HF's
q/k rows load unpermuted; positions count each row's real tokens, so left padding does not shift
them), ``mlp="gated"``, grouped k/v heads (``kv_heads``; the KV cache stores k/v heads), a head
width of its own (``attn_head_dim``), separate q/k/v, an untied output projection. Each reproduces
HF's ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``GemmaForCausalLM`` (``tests/test_models_families.py``).

Chameleon (issue 24) is that block with two more fields: ``qk_norm="layernorm_per_head"`` (each
head's query and key normalised by a LayerNorm with per-head weights before the rotary,
``norms.HeadNorm``) and ``swin_norm`` (the 30B model's norms after attention and FFN, inside the
residual). It reproduces HF's ``ChameleonForConditionalGeneration`` (``tests/test_models_chameleon.py``).

Attention runs through ``torch.nn.functional.scaled_dot_product_attention``; tokens equal to
``padding_idx`` are masked as keys and get the padding position row, so left-padded batches give
each row the result it would give alone (unlike metaseq's training path, which ignores padding).

Decoding with a ``KVCache`` has two paths: the dynamic one (``build_context``: the attended keys grow
with the cache) and a static one for one-token decode steps (``span=`` in ``extract_features``,
``build_static_context``: a fixed key span, positions and masks computed on the device), which has
the same shapes every step, asks the host nothing, and so can be captured in a CUDA graph.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import keys
from .cache import KVCache
from .config import CrossConfig, DecoderConfig, ModelConfig
from .norms import HeadNorm, make_norm
from .rotary import apply_rotary, rotary_tables


@dataclass
class AttentionContext:
    """What every attention call of one forward pass shares."""

    mask: torch.Tensor | None
    """(B, 1, T, S) bool, True = may attend; None with ``is_causal`` or when all keys are visible."""
    is_causal: bool
    cache: KVCache | None
    write_index: torch.Tensor | None = None
    """Static steps only: (T,) device positions the chunk's keys/values are written at."""
    span: int = 0
    """Static steps only: cached keys [0, span) are attended (``mask`` hides those not yet valid)."""
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    """Rotary positions: (cos, sin), each (B, 1, T, D), for q and k of every attention (None:
    learned positions). JAM-Cross gives each branch its own context with its branch's tables."""


def build_context(
    tokens: torch.Tensor, *, padding_idx: int, cache: KVCache | None, span: int | None = None
) -> AttentionContext:
    """Causal + key-padding mask for a chunk of ``tokens`` (B, T) appended after ``cache``
    (``span``: a static step, see ``build_static_context``)."""
    if span is not None:
        return build_static_context(tokens, padding_idx=padding_idx, cache=cache, span=span)
    B, T = tokens.shape
    pad = tokens.eq(padding_idx)  # (B, T)
    start = 0
    if cache is not None:
        cache.check_room(T)
        start = cache.length
        cache.key_padding[:, start : start + T] = pad
        key_pad = cache.key_padding[:, : start + T]
    else:
        key_pad = pad
    has_pad = bool(key_pad.any())
    if not has_pad and start == 0:
        return AttentionContext(mask=None, is_causal=T > 1, cache=cache)
    if not has_pad and T == 1:
        return AttentionContext(mask=None, is_causal=False, cache=cache)
    S = start + T
    idx_q = torch.arange(start, S, device=tokens.device)[:, None]  # (T, 1) absolute query positions
    idx_k = torch.arange(S, device=tokens.device)[None, :]  # (1, S)
    causal = idx_k <= idx_q  # (T, S)
    mask = causal[None, None] & ~key_pad[:, None, None, :]  # (B, 1, T, S)
    # A query may always see itself: pad queries then stay finite (their outputs are ignored).
    mask = mask | (idx_k == idx_q)[None, None]
    return AttentionContext(mask=mask, is_causal=False, cache=cache)


def build_static_context(
    tokens: torch.Tensor, *, padding_idx: int, cache: KVCache | None, span: int
) -> AttentionContext:
    """The same mask as ``build_context`` for a chunk (B, T) written at ``cache.offset`` (a device
    tensor), over a fixed ``span`` of cached keys: keys after the query and padding keys are masked,
    so whatever the cache holds there is never attended. Shapes depend on (B, T, span) only and
    nothing is read back to the host, so a CUDA graph can capture it and replay it every step."""
    if cache is None:
        raise ValueError("a static step needs a KV cache")
    B, T = tokens.shape
    cache.check_room(T)
    if not cache.length + T <= span <= cache.max_len:
        raise ValueError(f"span {span} must cover the {cache.length + T} keys after this chunk "
                         f"and fit the cache of {cache.max_len}")
    index = cache.offset + torch.arange(T, device=tokens.device)  # (T,) absolute query positions
    cache.key_padding.index_copy_(1, index, tokens.eq(padding_idx))
    idx_k = torch.arange(span, device=tokens.device)[None, :]  # (1, S)
    idx_q = index[:, None]  # (T, 1)
    mask = (idx_k <= idx_q)[None, None] & ~cache.key_padding[:, None, None, :span]  # (B, 1, T, S)
    mask = mask | (idx_k == idx_q)[None, None]  # a pad query sees itself (as in build_context)
    return AttentionContext(mask=mask, is_causal=False, cache=cache, write_index=index, span=span)


def real_token_counts(
    tokens: torch.Tensor, *, padding_idx: int, cache: KVCache | None, max_positions: int, check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(nonpad, counts), both (B, T): whether each token is real, and how many real tokens each row
    has up to and including it (the cache's earlier ones counted).

    ``check=False`` skips the length check (a host sync); static steps rely on the caller's budget."""
    nonpad = tokens.ne(padding_idx).long()  # (B, T)
    counts = nonpad.cumsum(dim=1)
    if cache is not None:
        counts = counts + cache.positions[:, None]
    if check and counts.numel() and int(counts.max()) > max_positions:
        raise ValueError(
            f"sequence of {int(counts.max())} tokens is longer than max_positions={max_positions}"
        )
    return nonpad, counts


def metaseq_positions(
    tokens: torch.Tensor, *, padding_idx: int, cache: KVCache | None, max_positions: int,
    check: bool = True,
) -> torch.Tensor:
    """Position ids as metaseq counts them: over non-pad tokens, starting at padding_idx + 1."""
    nonpad, counts = real_token_counts(tokens, padding_idx=padding_idx, cache=cache, max_positions=max_positions,
                                       check=check)
    return counts * nonpad + padding_idx


def rotary_positions(
    tokens: torch.Tensor, *, padding_idx: int, cache: KVCache | None, max_positions: int, check: bool = True,
) -> torch.Tensor:
    """(B, T) rotary positions: each row's real tokens 0, 1, 2, ... (HF ``generate``'s
    ``attention_mask.cumsum(-1) - 1``), so a left-padded row has the positions it has alone; pad
    tokens get 0 (they are masked as keys, and nothing reads their outputs)."""
    _, counts = real_token_counts(tokens, padding_idx=padding_idx, cache=cache, max_positions=max_positions,
                                  check=check)
    return (counts - 1).clamp_(min=0)


ACTIVATION_FNS = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
}
"""``DecoderConfig.activation`` -> its function (``gelu_tanh`` = HF ``gelu_pytorch_tanh``)."""


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ctx: AttentionContext, slot: int,
    dropout_p: float,
) -> torch.Tensor:
    """SDPA of (B, H, T, D) queries over (B, G, S, D) keys/values, G k/v heads (G divides H: query
    head h reads k/v head h // (H / G)), appending k/v to the cache slot first when decoding."""
    if ctx.write_index is not None:
        k, v = ctx.cache.write_at(slot, k, v, index=ctx.write_index, span=ctx.span)
    elif ctx.cache is not None:
        k, v = ctx.cache.write(slot, k, v)
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal, dropout_p=dropout_p
        )
    if ctx.mask is None:  # SDPA's own grouped attention (flash kernels take it without copies)
        return F.scaled_dot_product_attention(q, k, v, is_causal=ctx.is_causal, dropout_p=dropout_p,
                                              enable_gqa=True)
    B, H, T, D = q.shape
    if T == 1:  # a decode step: a group's H/G queries are the query axis of its one k/v head
        out = F.scaled_dot_product_attention(q.view(B, k.shape[1], groups, D), k, v, attn_mask=ctx.mask,
                                             dropout_p=dropout_p)  # the mask (B, 1, 1, S) fits each group
        return out.view(B, H, 1, D)
    # a mask with several queries: the masked kernels take no groups, so repeat k/v per query head
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal, dropout_p=dropout_p)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, T, E = x.shape
    return x.view(B, T, heads, E // heads).transpose(1, 2)  # (B, H, T, D)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)  # (B, T, E)


class Attention(nn.Module):
    """What self- and cross-attention share: head width, KV-cache slot, dropout, rotary positions,
    and SDPA then ``out_proj`` (registered by the subclass after its input projections: metaseq's
    key order).

    The numbers of query and k/v heads are read off the projections' widths (``head_dim`` is
    fixed), so a tensor-parallel rank, whose column-parallel q/k/v hold whole heads, computes its
    local heads with no bookkeeping; ``heads`` is the model's (a host checks its split with it)."""

    out_proj: nn.Linear

    def __init__(self, cfg: DecoderConfig, slot: int) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.head_dim
        self.slot = slot
        self.dropout = cfg.attention_dropout
        self.q_norm: nn.Module | None = None  # per-head q/k norms (``qk_norm``): self-attention only
        self.k_norm: nn.Module | None = None

    def attend_and_project(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           ctx: AttentionContext) -> torch.Tensor:
        """(B, T, H D), 2 x (B, T, G D) -> (B, T, E)."""
        D = self.head_dim
        q, k, v = split_heads(q, q.shape[-1] // D), split_heads(k, k.shape[-1] // D), split_heads(v, v.shape[-1] // D)
        if self.q_norm is not None:  # Chameleon: per head, before the rotary (HF, Meta's code)
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx.rotary is not None:
            cos, sin = ctx.rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attend(q, k, v, ctx=ctx, slot=self.slot, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(merge_heads(out))


class SelfAttention(Attention):
    """Self-attention: fused ``qkv_proj`` with rows [K; V; Q] as in metaseq (``qkv="fused"``), or
    separate ``q_proj`` (H D, E), ``k_proj`` / ``v_proj`` (G D, E) (``qkv="separate"``); with
    ``qk_norm``, per-head ``q_norm`` (H, D) and ``k_norm`` (G, D)."""

    def __init__(self, cfg: DecoderConfig, slot: int) -> None:
        super().__init__(cfg, slot)
        E = cfg.embed_dim
        self.fused = cfg.qkv == "fused"
        if self.fused:
            self.qkv_proj = nn.Linear(E, 3 * E, bias=cfg.bias)
        else:
            q_dim, kv_dim = cfg.heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            self.q_proj = nn.Linear(E, q_dim, bias=cfg.has_qkv_bias)
            self.k_proj = nn.Linear(E, kv_dim, bias=cfg.has_qkv_bias)
            self.v_proj = nn.Linear(E, kv_dim, bias=cfg.has_qkv_bias)
        self.out_proj = nn.Linear(cfg.heads * cfg.head_dim, E, bias=cfg.bias)
        if cfg.qk_norm == "layernorm_per_head":
            self.q_norm = HeadNorm(cfg.heads, cfg.head_dim)
            self.k_norm = HeadNorm(cfg.num_kv_heads, cfg.head_dim)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if self.fused:
            k, v, q = self.qkv_proj(x).chunk(3, dim=-1)  # 3 x (B, T, E)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.attend_and_project(q, k, v, ctx)


class PreLNBlock(nn.Module):
    """What a decoder layer and a JAM-Cross cross block share: x + Attn(N(x)), then x + FFN(N(x)),
    N the config's norm.

    Subclasses register their attention and its norm, then call ``add_ffn`` (this keeps
    metaseq's key names ``fc1``, ``fc2``, ``final_layer_norm`` on the layer itself).
    """

    cfg: DecoderConfig

    def add_ffn(self, cfg: DecoderConfig) -> None:
        self.gated = cfg.mlp == "gated"
        self.act = ACTIVATION_FNS[cfg.activation]
        if self.gated:
            self.fc_gate = nn.Linear(cfg.embed_dim, cfg.ffn_dim, bias=cfg.bias)
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_dim, bias=cfg.bias)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.embed_dim, bias=cfg.bias)
        self.final_layer_norm = make_norm(cfg.embed_dim, cfg)

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        """The FFN on normalised (B, T, E): fc2(act(fc1(h))), or gated fc2(act(fc_gate(h)) * fc1(h))."""
        if self.gated:
            return self.fc2(self.act(self.fc_gate(h)) * self.fc1(h))
        return self.fc2(self.act(self.fc1(h)))

    def residual_and_ffn(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """x + dropout(attn_out), then + FFN(N(x)) with dropout: (B, T, E) -> (B, T, E)."""
        cfg = self.cfg
        x = x + F.dropout(attn_out, p=cfg.dropout, training=self.training)
        return x + F.dropout(self.ffn(self.final_layer_norm(x)), p=cfg.dropout, training=self.training)


class DecoderLayer(PreLNBlock):
    """Pre-LN: x + Attn(LN(x)), then x + FFN(LN(x)); with ``swin_norm`` (Chameleon-30B) the norms
    follow the sublayers: x + LN(Attn(x)), then x + LN(FFN(x)) (same tensors, same names)."""

    def __init__(self, cfg: DecoderConfig, slot: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.self_attn = SelfAttention(cfg, slot)
        self.self_attn_layer_norm = make_norm(cfg.embed_dim, cfg)
        self.add_ffn(cfg)
        self.swin = cfg.swin_norm

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if self.swin:
            p, training = self.cfg.dropout, self.training
            x = x + F.dropout(self.self_attn_layer_norm(self.self_attn(x, ctx)), p=p, training=training)
            return x + F.dropout(self.final_layer_norm(self.ffn(x)), p=p, training=training)
        return self.residual_and_ffn(x, self.self_attn(self.self_attn_layer_norm(x), ctx))


def init_tensor_(key: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Give the fresh parameter ``key`` of the model ``cfg`` its start value in place
    (``keys.init_rule``). Every matrix and embedding draws N(0, init_std) from torch's global
    generator first, also one that the rule then sets to zeros or [I/2, I/2]: the draws, one per
    tensor in ``named_parameters()`` order, are a model's random stream (``init_parameters_``), so
    a tensor built on its own from that stream gets the same bits (``hosts.metaseq``)."""
    rule = keys.init_rule(key, cfg)
    std = cfg.parent.init_std if isinstance(cfg, CrossConfig) else cfg.init_std
    with torch.no_grad():
        if rule == "ones":
            return t.fill_(1.0)
        if key.endswith("bias") or keys.is_norm(key):  # vectors draw nothing (Gemma's norms: 0)
            return t.zero_()
        t.normal_(0.0, std)
        if rule == "zeros":
            t.zero_()
        elif rule == "eye_halves":
            t.copy_(eye_halves(cfg, dtype=t.dtype, device=t.device))
    return t


def eye_halves(cfg: CrossConfig, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
    """The ``preserve`` feature projection on ``cat([x_img, x_llm])``: [P_img / 2, P_llm / 2],
    P_s the (W, E_s) identity (ones on the diagonal; W = ``cfg.output_dim``), so it averages the
    branches' states, each zero-padded to W. Symmetric: [I/2, I/2]."""
    W = cfg.output_dim
    return torch.cat([torch.eye(W, cfg.img.embed_dim, dtype=dtype, device=device) / 2,
                      torch.eye(W, cfg.llm.embed_dim, dtype=dtype, device=device) / 2], dim=1)


def fresh_buffer(key: str) -> torch.Tensor:
    """The value the buffer ``key`` starts with: metaseq's ``decoder.version``, the one buffer."""
    if key != keys.VERSION:
        raise KeyError(f"{key}: not a buffer of the key schema")
    return torch.tensor([keys.VERSION_VALUE])


def init_parameters_(model: nn.Module, cfg: ModelConfig) -> None:
    """``init_tensor_`` on every parameter of ``model`` in order (those on the meta device keep
    no values, and draw nothing)."""
    for key, p in model.named_parameters():
        if not p.is_meta:
            init_tensor_(key, p, cfg)


class Decoder(nn.Module):
    """The ``decoder.*`` submodule: embeddings (learned positions only with ``positions="learned"``),
    layers, final norm, output projection (tied to the embedding unless ``tie_embeddings=False``)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("version", fresh_buffer(keys.VERSION))
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=cfg.padding_idx)
        if cfg.learned_positions:
            self.embed_positions = nn.Embedding(cfg.num_position_rows, cfg.embed_dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, slot=i) for i in range(cfg.layers))
        self.layer_norm = make_norm(cfg.embed_dim, cfg)
        self.output_projection = nn.Linear(cfg.embed_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output_projection.weight = self.embed_tokens.weight
        self.embed_scale = math.sqrt(cfg.embed_dim) if cfg.scale_embedding else 1.0

    def embed(
        self, tokens: torch.Tensor, positions_table: nn.Embedding | None, cache: KVCache | None, *,
        check_positions: bool = True,
    ) -> torch.Tensor:
        return embed_input(
            self, tokens, positions_tables=[positions_table], cfg=self.cfg, cache=cache,
            check_positions=check_positions,
        )[0]


@functools.lru_cache(maxsize=32)
def scale_in_dtype(scale: float, dtype: torch.dtype) -> float:
    """``scale`` rounded to fp32 and then to ``dtype`` (HF Gemma's normaliser: sqrt(3072) is 55.5 in
    bf16), as a Python number: multiplying by it is HF's multiply by the rounded tensor."""
    return float(torch.tensor(scale, dtype=torch.float32).to(dtype))


def embed_input(
    decoder: nn.Module, tokens: torch.Tensor, *, positions_tables: Sequence[nn.Embedding | None],
    cfg: DecoderConfig, cache: KVCache | None, check_positions: bool = True,
    token_table: nn.Embedding | None = None, scale: float | None = None,
) -> list[torch.Tensor]:
    """scale * token embedding + each learned position table (None: none, rotary positions), then
    dropout: (B, T) -> [(B, T, E)].

    The token embedding (``decoder.embed_tokens`` unless ``token_table``) is looked up once and
    shared (JAM-Cross has one position table per branch). ``cfg.embed_scale_in_dtype``: the scale
    is rounded to the embedding's dtype first (``scale_in_dtype``).
    """
    pos = metaseq_positions(
        tokens, padding_idx=cfg.padding_idx, cache=cache, max_positions=cfg.max_positions, check=check_positions
    ) if cfg.learned_positions else None
    table = decoder.embed_tokens if token_table is None else token_table
    factor = decoder.embed_scale if scale is None else scale
    if cfg.embed_scale_in_dtype:
        emb = table(tokens)
        tok = emb * scale_in_dtype(factor, emb.dtype)
    else:
        tok = factor * table(tokens)
    return [F.dropout(tok if t is None else tok + t(pos), p=cfg.dropout, training=decoder.training)
            for t in positions_tables]


def rotary_context(ctx: AttentionContext, tokens: torch.Tensor, *, cfg: DecoderConfig, cache: KVCache | None,
                   dtype: torch.dtype, check: bool = True) -> AttentionContext:
    """``ctx`` with the rotary tables of ``cfg``'s positions for the chunk ``tokens`` (B, T)
    (``ctx`` itself for learned positions)."""
    if cfg.learned_positions:
        return ctx
    pos = rotary_positions(tokens, padding_idx=cfg.padding_idx, cache=cache, max_positions=cfg.max_positions,
                           check=check)
    return dataclasses.replace(ctx, rotary=rotary_tables(pos, cfg=cfg, dtype=dtype))


class DecoderLM(nn.Module):
    """Decoder-only LM; ``state_dict()`` is metaseq's ``model`` dict (keys ``decoder.*``)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = Decoder(cfg)
        init_parameters_(self, cfg)

    @property
    def num_attention_slots(self) -> int:
        return self.cfg.layers

    def setup_caches(
        self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        p = self.decoder.embed_tokens.weight
        return KVCache(
            num_slots=self.num_attention_slots, batch_size=batch_size, heads=self.cfg.num_kv_heads,
            head_dim=self.cfg.head_dim, max_len=max_len, dtype=dtype or p.dtype, device=device or p.device,
        )

    def extract_features(
        self, tokens: torch.Tensor, *, cache: KVCache | None = None, span: int | None = None
    ) -> torch.Tensor:
        """(B, T) token ids -> (B, T, E) final hidden states (after the final LayerNorm).

        ``span``: a static step over the first ``span`` cache positions (``build_static_context``)."""
        d = self.decoder
        ctx = build_context(tokens, padding_idx=self.cfg.padding_idx, cache=cache, span=span)
        x = d.embed(tokens, getattr(d, "embed_positions", None), cache, check_positions=span is None)
        ctx = rotary_context(ctx, tokens, cfg=self.cfg, cache=cache, dtype=x.dtype, check=span is None)
        for layer in d.layers:
            x = layer(x, ctx)
        if cache is not None:
            cache.advance(tokens.ne(self.cfg.padding_idx).sum(dim=1), tokens.shape[1])
        return d.layer_norm(x)

    def output_layer(self, features: torch.Tensor) -> torch.Tensor:
        return self.decoder.output_projection(features)  # (B, T, V)

    def forward(
        self, tokens: torch.Tensor, *, cache: KVCache | None = None, span: int | None = None
    ) -> torch.Tensor:
        return self.output_layer(self.extract_features(tokens, cache=cache, span=span))

"""The three fusions for Llama-family parents (issue 23, item 4), and Chameleon parents (issue 24).

JAM-Width (Eq. 2-3) on separate q/k/v with grouped k/v heads, the gated MLP and RMSNorm, by hand
on a tiny case and as a model: each wide query head is one parent's head (its rotary layout and
its k/v group kept). What Eq. 2 means for RMSNorm and the embedding scale (docs/ARCHITECTURE.md,
"JAM-Width for the Llama family"). JAM-Uniform of identical parents is the parent. JAM-Cross
``preserve`` reproduces each Llama / Gemma parent in its branch, symmetric and of two sizes, with
untied output heads. ``jam params`` counts ``gemma_7b`` x ``gemma_7b`` and ``llama3_8b`` x
``llama3_8b`` by hand.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from _model_util import pre_norm_hidden, randomize_, random_tokens
from jam_metaseq.fusion import cross_tensor, merge_tensor, state_shapes, widen_tensor
from jam_metaseq.models import DecoderLM, JamCrossLM, build_model, count_parameters, cross_of, keys, preset, width_of
from jam_metaseq.models.config import DecoderConfig
from jam_metaseq.models.decoder import build_context, rotary_context
from jam_metaseq.models.norms import RMSNorm

torch.set_num_threads(1)
IMG_START, IMG_END = 64, 120


def _parents(cfg: DecoderConfig) -> tuple[DecoderLM, DecoderLM]:
    return tuple(randomize_(DecoderLM(cfg), seed=s).eval() for s in (1, 2))  # type: ignore[return-value]


def _widened(cfg: DecoderConfig, llm: DecoderLM, img: DecoderLM, init: str = "copy") -> DecoderLM:
    L, I = llm.state_dict(), img.state_dict()
    wide = DecoderLM(width_of(cfg)).eval()
    wide.load_state_dict({k: widen_tensor(k, L[k], I[k], parent=cfg, init=init) for k in L}, strict=True)
    return wide


# ---- JAM-Width ---------------------------------------------------------------------------------
def test_width_blocks_by_hand():
    """E = 4, 2 query heads and 1 k/v head of width 2, F = 3: the Eq. 2 / Eq. 3 blocks of every
    kind of tensor, written out."""
    cfg = preset("llama_tiny", embed_dim=4, heads=2, kv_heads=1, ffn_dim=3, vocab_size=5)
    a = lambda *s: torch.arange(float(torch.Size(s).numel())).view(*s)  # noqa: E731
    cases = {  # name: (LLM tensor, image tensor)
        f"{keys.LAYERS}.0.{keys.K_PROJ}.weight": (a(2, 4), 10 + a(2, 4)),
        f"{keys.LAYERS}.0.{keys.Q_PROJ}.weight": (a(4, 4), 10 + a(4, 4)),
        f"{keys.LAYERS}.0.self_attn.out_proj.weight": (a(4, 4), 10 + a(4, 4)),
        f"{keys.LAYERS}.0.{keys.FC_GATE}.weight": (a(3, 4), 10 + a(3, 4)),
        f"{keys.LAYERS}.0.{keys.FC2}.weight": (a(4, 3), 10 + a(4, 3)),
    }
    for name, (l, i) in cases.items():
        copy = widen_tensor(name, l, i, parent=cfg, init="copy")
        assert torch.equal(copy, torch.cat([torch.cat([l, l], 1), torch.cat([i, i], 1)])), name
        avg = widen_tensor(name, l, i, parent=cfg, init="average")
        m = (l + i) / 2
        assert torch.equal(avg, torch.cat([torch.cat([l, m], 1), torch.cat([i, m], 1)])), name
    # k/v: rows [0, 2) are the LLM's one k/v head, rows [2, 4) the image parent's: wide k/v head 1
    k = widen_tensor(f"{keys.LAYERS}.0.{keys.K_PROJ}.weight", a(2, 4), 10 + a(2, 4), parent=cfg)
    assert k.shape == (4, 8) and torch.equal(k[2:, :4], 10 + a(2, 4))
    norm = widen_tensor(f"{keys.LAYERS}.0.final_layer_norm.weight", a(4), 10 + a(4), parent=cfg)
    assert torch.equal(norm, torch.cat([a(4), 10 + a(4)]))
    for name in (keys.EMBED, keys.OUTPUT):  # the untied head widens like the embedding: [llm | img]
        assert torch.equal(widen_tensor(name, a(5, 4), 10 + a(5, 4), parent=cfg),
                           torch.cat([a(5, 4), 10 + a(5, 4)], 1))
    w = width_of(cfg)
    assert (w.heads, w.num_kv_heads, w.head_dim, w.embed_dim) == (4, 2, 2, 8)  # 2 query heads per k/v head


def test_parent_of_width_inverts_width_of():
    from jam_metaseq.models.config import parent_of_width

    for name in ("tiny", "llama_tiny", "qwen2_tiny", "gemma_tiny", "llama3_8b"):
        assert parent_of_width(width_of(preset(name))) == preset(name), name
    with pytest.raises(ValueError, match="kv heads 1 must all be even"):
        parent_of_width(preset("gemma_tiny"))


def _attention_heads(model: DecoderLM, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Layer 0's attention output before ``out_proj`` (B, T, H D) on normalised input ``x``."""
    seen = []
    attn = model.decoder.layers[0].self_attn
    h = attn.out_proj.register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    try:
        ctx = build_context(tokens, padding_idx=model.cfg.padding_idx, cache=None)
        ctx = rotary_context(ctx, tokens, cfg=model.cfg, cache=None, dtype=x.dtype)
        with torch.no_grad():
            attn(x, ctx)
    finally:
        h.remove()
    return seen[0]


@pytest.mark.parametrize("family", ["llama_tiny", "gemma_tiny", "chameleon_tiny"])
def test_wide_query_heads_are_the_parents_heads(family):
    """Eq. 2 (copy) on [a | b]: q, k and v of the wide heads [0, H) are the LLM's projections of
    a + b, those of [H, 2H) the image parent's; k/v head groups stay with their parent's query heads
    and RoPE turns each head as its parent did, so each wide head's output is the parent head's."""
    cfg = preset(family)
    llm, img = _parents(cfg)
    wide = _widened(cfg, llm, img)
    tokens = random_tokens(2, 9, low=4, high=128, seed=3)
    a, b = torch.randn(2, 9, cfg.embed_dim), torch.randn(2, 9, cfg.embed_dim)
    got = _attention_heads(wide, torch.cat([a, b], -1), tokens)
    HD = cfg.heads * cfg.head_dim
    torch.testing.assert_close(got[..., :HD], _attention_heads(llm, a + b, tokens), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[..., HD:], _attention_heads(img, a + b, tokens), atol=1e-5, rtol=0)
    # control: k/v heads dealt alternately from the two parents break the grouping
    k = wide.decoder.layers[0].self_attn.k_proj.weight
    G, D = cfg.num_kv_heads, cfg.head_dim
    with torch.no_grad():
        k.copy_(k.view(2, G, D, -1).transpose(0, 1).reshape(k.shape))
    bad = _attention_heads(wide, torch.cat([a, b], -1), tokens)
    assert (bad[..., :HD] - got[..., :HD]).abs().max() > 1e-3 or G == 1  # one k/v head: no other order
    if G == 1:  # swap the two parents' k/v heads instead
        with torch.no_grad():
            k.copy_(torch.cat([k[D:], k[:D]]))
        assert (_attention_heads(wide, torch.cat([a, b], -1), tokens)[..., :HD] - got[..., :HD]).abs().max() > 1e-3


def test_rmsnorm_over_the_doubled_width():
    """RMSNorm of the wide model on [a | b] with weights [w_llm; w_img]: each half is its parent's
    weight times its input over the joint rms sqrt((ms(a) + ms(b)) / 2), so it equals the parent's
    norm exactly when ms(a) = ms(b), and differs by sqrt(ms(a) / ((ms(a) + ms(b)) / 2)) otherwise."""
    E, eps = 8, 1e-6
    for plus_one in (False, True):
        n_l, n_i = (RMSNorm(E, eps=eps, affine=True, plus_one=plus_one) for _ in range(2))
        wide = RMSNorm(2 * E, eps=eps, affine=True, plus_one=plus_one)
        with torch.no_grad():
            n_l.weight.normal_(), n_i.weight.normal_()
            wide.weight.copy_(torch.cat([n_l.weight, n_i.weight]))
        a = torch.randn(3, E)
        b = torch.randn(3, E)
        b = b * a.pow(2).mean(-1, keepdim=True).sqrt() / b.pow(2).mean(-1, keepdim=True).sqrt()  # ms(b) = ms(a)
        with torch.no_grad():
            out = wide(torch.cat([a, b], -1))
            torch.testing.assert_close(out, torch.cat([n_l(a), n_i(b)], -1), atol=1e-5, rtol=1e-5)
            out = wide(torch.cat([a, 3 * b], -1))  # ms(3b) = 9 ms(a): the joint rms is sqrt(5) rms(a)
            torch.testing.assert_close(out[:, :E], n_l(a) / 5 ** 0.5, atol=1e-4, rtol=1e-4)


def test_the_wide_embedding_is_scaled_by_sqrt_2e():
    """Gemma's sqrt(E) scale becomes sqrt(2E) in the wide model: each half of the wide embedding is
    sqrt(2) times its parent's scaled embedding."""
    cfg = preset("gemma_tiny")
    llm, img = _parents(cfg)
    wide = _widened(cfg, llm, img)
    tokens = random_tokens(1, 5, low=4, high=128, seed=1)
    with torch.no_grad():
        x = wide.decoder.embed(tokens, None, None)
        x_l, x_i = llm.decoder.embed(tokens, None, None), img.decoder.embed(tokens, None, None)
    torch.testing.assert_close(x, 2 ** 0.5 * torch.cat([x_l, x_i], -1), atol=1e-5, rtol=1e-5)


# ---- JAM-Uniform ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama_tiny", "qwen2_tiny", "gemma_tiny"])
def test_uniform_of_identical_parents_is_the_parent(family):
    cfg = preset(family)
    llm, _ = _parents(cfg)
    state = llm.state_dict()
    merged = DecoderLM(cfg).eval()
    merged.load_state_dict({k: merge_tensor(k, [v, v]) for k, v in state.items()}, strict=True)
    tokens = random_tokens(2, 8, low=4, high=128, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), llm(tokens), atol=1e-6, rtol=0)


# ---- JAM-Cross ------------------------------------------------------------------------------------
def _fused(cfg, llm: DecoderLM, img: DecoderLM) -> JamCrossLM:
    L, I = llm.state_dict(), img.state_dict()
    model = JamCrossLM(cfg).eval()
    model.load_state_dict({k: cross_tensor(k, cfg=cfg, llm=L.__getitem__, img=I.__getitem__, seed=0)
                           for k in state_shapes(cfg)}, strict=True)
    return model


LLAMA = preset("llama_tiny", layers=3)
CROSS_CASES = {
    "llama": (LLAMA, LLAMA),
    "gemma": (preset("gemma_tiny", layers=3), preset("gemma_tiny", layers=3)),
    # two sizes: the image parent narrower (16), shallower, with one k/v head of width 8
    "llama_asymmetric": (LLAMA, preset("llama_tiny", embed_dim=16, ffn_dim=48, heads=2, kv_heads=1, layers=2)),
    # Chameleon's blocks (per-head q/k norms, the 30B model's swin norms) in both branches
    "chameleon_swin": (preset("chameleon_tiny", layers=3, swin_norm=True),) * 2,
    # two families (issue 24): a Llama branch beside a Chameleon branch (q/k norms), same size and narrower
    "llama_beside_chameleon": (LLAMA, dataclasses.replace(LLAMA, qk_norm="layernorm_per_head")),
    "llama_beside_small_chameleon_swin": (LLAMA, dataclasses.replace(
        LLAMA, qk_norm="layernorm_per_head", swin_norm=True, embed_dim=16, ffn_dim=48, heads=2, kv_heads=1, layers=2)),
}


@pytest.mark.parametrize("case", list(CROSS_CASES))
@pytest.mark.parametrize("every", [1, 2])
def test_preserve_reproduces_each_parent_in_its_branch(case, every):
    a, b = CROSS_CASES[case]
    llm, img = randomize_(DecoderLM(a), seed=1).eval(), randomize_(DecoderLM(b), seed=2).eval()
    cfg = cross_of(a, every, cross_init="preserve", image_vocab_start=IMG_START, image_vocab_end=IMG_END,
                   image_parent=b)
    fused = _fused(cfg, llm, img)
    text = random_tokens(2, 10, low=4, high=IMG_START, seed=3)
    image = random_tokens(2, 10, low=IMG_START, high=IMG_END, seed=4)
    with torch.no_grad():
        x_llm, _ = fused.branch_features(text)
        _, x_img = fused.branch_features(image)
    torch.testing.assert_close(x_llm, pre_norm_hidden(llm, text), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_img, pre_norm_hidden(img, image), atol=1e-5, rtol=0)
    assert isinstance(fused.decoder.layer_norm, RMSNorm)
    assert all(isinstance(blk.cross_attn_layer_norm, RMSNorm) and hasattr(blk, "fc_gate")
               for blk in [*fused.decoder.x_attn_layers_llm, *fused.decoder.x_attn_layers_cm3])
    paper = _fused(cross_of(a, every, image_vocab_start=IMG_START, image_vocab_end=IMG_END, image_parent=b), llm, img)
    with torch.no_grad():  # control: the paper init mixes the branches
        assert (paper.branch_features(text)[0] - pre_norm_hidden(llm, text)).abs().max() > 1e-3


def test_preserve_of_identical_untied_parents_is_the_parent():
    """Llama's untied head: JAM-Cross's own output projection comes from the parents' heads (not
    their embeddings), so crossing a parent with itself gives the parent's logits."""
    llm = randomize_(DecoderLM(LLAMA), seed=1).eval()
    cfg = cross_of(LLAMA, 1, cross_init="preserve", image_vocab_start=IMG_START, image_vocab_end=IMG_END)
    assert not cfg.tied_output
    fused = _fused(cfg, llm, llm)
    assert fused.decoder.output_projection.weight is not fused.decoder.embed_tokens.weight
    tokens = random_tokens(2, 11, low=4, high=128, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens), llm(tokens), atol=1e-5, rtol=0)


def test_parents_of_two_families_are_refused_by_field():
    with pytest.raises(ValueError, match="must share bias: the LLM has False"):
        cross_of(preset("llama_tiny"), 1, image_parent=preset("tiny"))


def test_each_branch_keeps_its_own_block():
    """A Chameleon image branch has its per-head q/k norms (and swin norms), the Llama branch none;
    the cross blocks are plain pre-norm blocks of their branch's shape on both sides."""
    a, b = CROSS_CASES["llama_beside_small_chameleon_swin"]
    cfg = cross_of(a, 1, image_parent=b)
    assert not cfg.symmetric and cfg.img.qk_norm == "layernorm_per_head" and cfg.llm.qk_norm == "none"
    names = keys.state_keys(cfg)
    assert any(n.startswith("decoder.layers_cm3.0.self_attn.q_norm") for n in names)
    assert not any(n.startswith(("decoder.layers_llm.", "decoder.x_attn_layers")) and "q_norm" in n for n in names)
    model = JamCrossLM(cfg)
    assert model.decoder.layers_cm3[0].swin and not model.decoder.layers_llm[0].swin
    assert set(model.state_dict()) == set(names)


# ---- parameter counts -----------------------------------------------------------------------------
def _cross_block(c: DecoderConfig) -> int:
    q, kv = c.heads * c.head_dim, c.num_kv_heads * c.head_dim
    return 2 * q * c.embed_dim + 2 * kv * c.embed_dim + 3 * c.embed_dim * c.ffn_dim + 2 * c.embed_dim


@pytest.mark.parametrize("name", ["gemma_7b", "llama3_8b"])
def test_jam_params_counts_of_two_7b_parents_by_hand(name, capsys):
    from jam_metaseq.cli import main, params_table

    p = preset(name)
    P, E, V = count_parameters(p), p.embed_dim, p.vocab_size
    heads = V * E * (1 if p.tie_embeddings else 2)  # embedding (+ untied output projection)
    base = 2 * (P - heads - E) + heads + E + 2 * E * E  # two branches, one final norm, the feature projection
    rows = {r["cross_every"]: r["params"] for r in params_table(name, name, [1, 2, 0])}
    assert rows == {0: base, 1: base + 2 * p.layers * _cross_block(p),
                    2: base + 2 * ((p.layers + 1) // 2) * _cross_block(p)}
    assert main(["params", "--llm", name, "--img", name, "--cross-every", "2"]) == 0
    assert f"{rows[2]:,}" in capsys.readouterr().out

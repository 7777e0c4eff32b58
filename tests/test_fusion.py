"""Fusion math (paper §2.1): JAM-Uniform (Eq. 1), JAM-Width (Eq. 2-3), JAM-Cross init (§2.1.3).

Hand-computed cases for the pure tensor functions, then whole tiny models fused tensor by tensor
(as the checkpoint tools stream them) and loaded with ``strict=True``: uniform of identical parents is
the parent, and JAM-Cross with ``preserve`` init reproduces each parent's hidden states in its branch.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _model_util import pre_norm_hidden, randomize_, random_tokens, tiny_cfg
from jam_metaseq.fusion import (
    cross_tensor, fresh_tensor, merge_tensor, state_shapes, widen_matrix, widen_tensor,
)
from jam_metaseq.models import DecoderLM, JamCrossLM, cross_of, uniform_of, width_of

IMG_START, IMG_END = 64, 120  # image-code rows of the tiny vocab (128)


# ---------------------------------------------------------------- JAM-Uniform (Eq. 1)

def test_merge_two_parents_is_the_mean():
    a, b = torch.tensor([[1.0, -2.0], [4.0, 0.5]]), torch.tensor([[3.0, 2.0], [0.0, 1.5]])
    assert torch.equal(merge_tensor("w", [a, b]), torch.tensor([[2.0, 0.0], [2.0, 1.0]]))


def test_merge_n_parents_weighted_hand_case():
    ts = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([5.0, 6.0])]
    out = merge_tensor("w", ts, weights=[0.5, 0.25, 0.25])
    assert torch.equal(out, torch.tensor([2.5, 3.5]))
    assert torch.equal(merge_tensor("w", ts), torch.tensor([3.0, 4.0]))  # default 1/N
    assert out.dtype == torch.float32


def test_merge_accumulates_low_precision_in_fp32():
    a = torch.tensor([1.0, 256.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0 / 256, 1.0], dtype=torch.bfloat16)
    out = merge_tensor("w", [a, b])
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([(1.0 + 1.0 / 256) / 2, 128.5]))


def test_merge_rejects_bad_input():
    with pytest.raises(ValueError, match="no parent"):
        merge_tensor("w", [])
    with pytest.raises(ValueError, match="2 parents but 3 weights"):
        merge_tensor("w", [torch.ones(2), torch.ones(2)], weights=[1, 0, 0])
    with pytest.raises(ValueError, match=r"w: parent 1 has shape \(3,\)"):
        merge_tensor("w", [torch.ones(2), torch.ones(3)])


def _uniform_state(parents: list[dict], weights=None) -> dict:
    return {k: merge_tensor(k, [p[k] for p in parents], weights=weights) for k in parents[0]}


def test_uniform_of_identical_parents_is_the_parent():
    cfg = tiny_cfg()
    parent = randomize_(DecoderLM(cfg), seed=1).eval()
    fused = DecoderLM(uniform_of(cfg)).eval()
    fused.load_state_dict(_uniform_state([parent.state_dict(), parent.state_dict()]), strict=True)
    tokens = random_tokens(2, 10, low=0, high=128, seed=0)
    with torch.no_grad():
        assert torch.equal(fused(tokens), parent(tokens))


def test_uniform_is_the_average_of_two_different_parents():
    cfg = tiny_cfg()
    a, b = (randomize_(DecoderLM(cfg), seed=s).state_dict() for s in (1, 2))
    fused = DecoderLM(uniform_of(cfg))
    fused.load_state_dict(_uniform_state([a, b]), strict=True)
    for k, v in fused.state_dict().items():
        torch.testing.assert_close(v, (a[k] + b[k]) / 2, atol=1e-7, rtol=0)
    one_hot = DecoderLM(cfg).eval()
    one_hot.load_state_dict(_uniform_state([a, b], weights=[0.0, 1.0]), strict=True)
    for k, v in one_hot.state_dict().items():
        assert torch.equal(v, b[k])


# ---------------------------------------------------------------- JAM-Width (Eq. 2-3)

W_LLM = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
W_IMG = torch.tensor([[5.0, 6.0], [7.0, 8.0]])


def test_widen_matrix_copy_is_eq2():
    assert widen_matrix(W_LLM, W_IMG, init="copy").tolist() == [
        [1, 2, 1, 2],
        [3, 4, 3, 4],
        [5, 6, 5, 6],
        [7, 8, 7, 8],
    ]


def test_widen_matrix_average_is_eq3():
    # W_average = [[3, 4], [5, 6]] fills the right half of both block rows.
    assert widen_matrix(W_LLM, W_IMG, init="average").tolist() == [
        [1, 2, 3, 4],
        [3, 4, 5, 6],
        [5, 6, 3, 4],
        [7, 8, 5, 6],
    ]


def test_widen_rejects_unknown_init_and_shape_mismatch():
    with pytest.raises(ValueError, match="init must be"):
        widen_matrix(W_LLM, W_IMG, init="zeros")
    with pytest.raises(ValueError, match="decoder.layers.0.fc1.weight"):
        widen_tensor("decoder.layers.0.fc1.weight", torch.ones(2, 3), torch.ones(3, 2), parent=tiny_cfg())


def _tiny_qkv_parent():
    # E = 2, one head of dim 2: qkv rows are K0 K1 V0 V1 Q0 Q1.
    return tiny_cfg(embed_dim=2, heads=1, ffn_dim=4, layers=1)


def test_widen_qkv_per_block_keeps_heads_whole():
    """Hand case: each of K, V, Q is widened on its own (Eq. 2), so in the 2-head result head 0 is
    the LLM's head and head 1 the image model's, in each of the K, V and Q blocks."""
    parent = _tiny_qkv_parent()
    llm = torch.arange(12.0).view(6, 2)  # K=[[0,1],[2,3]] V=[[4,5],[6,7]] Q=[[8,9],[10,11]]
    img = llm + 100
    got = widen_tensor("decoder.layers.0.self_attn.qkv_proj.weight", llm, img, parent=parent, init="copy")
    assert got.tolist() == [
        [0, 1, 0, 1], [2, 3, 2, 3], [100, 101, 100, 101], [102, 103, 102, 103],  # K: head 0 | head 1
        [4, 5, 4, 5], [6, 7, 6, 7], [104, 105, 104, 105], [106, 107, 106, 107],  # V
        [8, 9, 8, 9], [10, 11, 10, 11], [108, 109, 108, 109], [110, 111, 110, 111],  # Q
    ]
    # The naive rule (widen the fused matrix as one block) would mix K/V/Q rows across heads.
    assert not torch.equal(got, widen_matrix(llm, img, init="copy"))
    bias = widen_tensor("decoder.layers.0.self_attn.qkv_proj.bias", torch.arange(6.0), torch.arange(6.0) + 100,
                        parent=parent)
    assert bias.tolist() == [0, 1, 100, 101, 2, 3, 102, 103, 4, 5, 104, 105]
    avg = widen_tensor("decoder.layers.0.self_attn.qkv_proj.weight", llm, img, parent=parent, init="average")
    assert avg[:4].tolist() == [[0, 1, 50, 51], [2, 3, 52, 53], [100, 101, 50, 51], [102, 103, 52, 53]]


def test_widen_embeddings_and_vectors_concatenate():
    parent = tiny_cfg()
    e_llm, e_img = torch.randn(128, 32), torch.randn(128, 32)
    for name in ("decoder.embed_tokens.weight", "decoder.embed_positions.weight", "decoder.output_projection.weight"):
        out = widen_tensor(name, e_llm, e_img, parent=parent)
        assert torch.equal(out, torch.cat([e_llm, e_img], dim=1))  # (rows, 2E) = [llm | img]
    v_llm, v_img = torch.randn(32), torch.randn(32)
    for name in ("decoder.layers.1.fc2.bias", "decoder.layers.0.final_layer_norm.weight", "decoder.layer_norm.bias"):
        assert torch.equal(widen_tensor(name, v_llm, v_img, parent=parent), torch.cat([v_llm, v_img]))


def _width_state(llm: dict, img: dict, *, parent, init: str) -> dict:
    return {k: widen_tensor(k, llm[k], img[k], parent=parent, init=init) for k in llm}


@pytest.mark.parametrize("init", ["copy", "average"])
@pytest.mark.parametrize("overrides", [{}, {"bias": False, "affine_ln": False}], ids=["opt", "cm3leon"])
def test_width_state_loads_strictly_and_follows_the_block_rule(init, overrides):
    parent = tiny_cfg(**overrides)
    llm, img = (randomize_(DecoderLM(parent), seed=s).state_dict() for s in (1, 2))
    state = _width_state(llm, img, parent=parent, init=init)
    wide = DecoderLM(width_of(parent)).eval()
    wide.load_state_dict(state, strict=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == state_shapes(width_of(parent))
    E, F = 32, 64
    x = lambda k: llm[k] if init == "copy" else (llm[k] + img[k]) / 2  # noqa: E731
    fc1 = "decoder.layers.1.fc1.weight"  # (2F, 2E): [[W_llm, X_llm], [W_img, X_img]]
    w = wide.decoder.layers[1].fc1.weight.detach()
    assert torch.equal(w[:F, :E], llm[fc1]) and torch.equal(w[F:, :E], img[fc1])
    torch.testing.assert_close(w[:F, E:], x(fc1), atol=0, rtol=0)
    # The fused model runs (finite logits over the full vocab).
    with torch.no_grad():
        out = wide(random_tokens(2, 8, low=0, high=128, seed=0))
    assert out.shape == (2, 8, 128) and torch.isfinite(out).all()


# ---------------------------------------------------------------- JAM-Cross init (§2.1.3)

def _cross_state(cfg, llm: dict, img: dict, seed: int = 0) -> dict:
    return {k: cross_tensor(k, cfg=cfg, llm=llm.__getitem__, img=img.__getitem__, seed=seed) for k in state_shapes(cfg)}




def _parents(parent_cfg):
    llm = randomize_(DecoderLM(parent_cfg), seed=1).eval()
    img = randomize_(DecoderLM(parent_cfg), seed=2).eval()
    return llm, img


def _fused(parent_cfg, every, init, llm, img, seed=0):
    cfg = cross_of(parent_cfg, every, cross_init=init, image_vocab_start=IMG_START, image_vocab_end=IMG_END)
    model = JamCrossLM(cfg).eval()
    model.load_state_dict(_cross_state(cfg, llm.state_dict(), img.state_dict(), seed=seed), strict=True)
    return model


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("overrides", [{}, {"bias": False, "affine_ln": False}], ids=["opt", "cm3leon"])
def test_preserve_init_reproduces_each_parent_in_its_branch(every, overrides):
    parent_cfg = tiny_cfg(layers=3, **overrides)
    llm, img = _parents(parent_cfg)
    fused = _fused(parent_cfg, every, "preserve", llm, img)
    text = random_tokens(2, 10, low=4, high=IMG_START, seed=3)  # text rows come from the LLM
    image = random_tokens(2, 10, low=IMG_START, high=IMG_END, seed=4)  # image rows from the image parent
    with torch.no_grad():
        x_llm, _ = fused.branch_features(text)
        _, x_img = fused.branch_features(image)
    torch.testing.assert_close(x_llm, pre_norm_hidden(llm, text), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_img, pre_norm_hidden(img, image), atol=1e-5, rtol=0)


def test_preserve_with_a_shared_embedding_reproduces_both_parents_on_mixed_tokens():
    parent_cfg = tiny_cfg(layers=4)
    llm, img = _parents(parent_cfg)
    with torch.no_grad():
        img.decoder.embed_tokens.weight.copy_(llm.decoder.embed_tokens.weight)
    fused = _fused(parent_cfg, 1, "preserve", llm, img)
    tokens = random_tokens(3, 12, low=4, high=128, seed=5)
    with torch.no_grad():
        x_llm, x_img = fused.branch_features(tokens)
        # Feature projection [I/2, I/2] then the averaged final LayerNorm.
        feats = fused.extract_features(tokens)
    torch.testing.assert_close(x_llm, pre_norm_hidden(llm, tokens), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_img, pre_norm_hidden(img, tokens), atol=1e-5, rtol=0)
    torch.testing.assert_close(feats, fused.decoder.layer_norm((x_llm + x_img) / 2), atol=1e-6, rtol=0)


def test_preserve_of_identical_parents_is_the_parent():
    parent_cfg = tiny_cfg(layers=3)
    llm, _ = _parents(parent_cfg)
    fused = _fused(parent_cfg, 1, "preserve", llm, llm)
    tokens = random_tokens(2, 11, low=0, high=128, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens), llm(tokens), atol=1e-5, rtol=0)


def test_paper_init_mixes_the_branches():
    """Control for the preserve tests: with normal-initialised cross blocks the branch changes."""
    parent_cfg = tiny_cfg(layers=3)
    llm, img = _parents(parent_cfg)
    fused = _fused(parent_cfg, 1, "paper", llm, img)
    text = random_tokens(2, 10, low=4, high=IMG_START, seed=3)
    with torch.no_grad():
        x_llm, _ = fused.branch_features(text)
    assert (x_llm - pre_norm_hidden(llm, text)).abs().max() > 1e-3


def test_cross_tensor_sources():
    parent_cfg = tiny_cfg(layers=2)
    llm, img = _parents(parent_cfg)
    cfg = cross_of(parent_cfg, 2, image_vocab_start=IMG_START, image_vocab_end=IMG_END)
    L, I = llm.state_dict(), img.state_dict()
    s = _cross_state(cfg, L, I)
    emb = s["decoder.embed_tokens.weight"]
    assert torch.equal(emb[:IMG_START], L["decoder.embed_tokens.weight"][:IMG_START])
    assert torch.equal(emb[IMG_START:IMG_END], I["decoder.embed_tokens.weight"][IMG_START:IMG_END])
    assert torch.equal(emb[IMG_END:], L["decoder.embed_tokens.weight"][IMG_END:])
    assert torch.equal(s["decoder.output_projection.weight"], emb)
    assert torch.equal(s["decoder.embed_positions_llm.weight"], L["decoder.embed_positions.weight"])
    assert torch.equal(s["decoder.embed_positions_cm3.weight"], I["decoder.embed_positions.weight"])
    assert torch.equal(s["decoder.layers_llm.1.fc1.weight"], L["decoder.layers.1.fc1.weight"])
    assert torch.equal(s["decoder.layers_cm3.0.self_attn.qkv_proj.weight"], I["decoder.layers.0.self_attn.qkv_proj.weight"])
    torch.testing.assert_close(s["decoder.layer_norm.weight"], (L["decoder.layer_norm.weight"] + I["decoder.layer_norm.weight"]) / 2)
    assert torch.equal(s["decoder.version"], torch.tensor([3.0]))
    # Fresh paper-init weights: N(0, init_std), zero biases, unit LayerNorms.
    q = s["decoder.x_attn_layers_llm.0.cross_attn.q_proj.weight"]
    assert 0.5 * cfg.parent.init_std < q.std() < 1.5 * cfg.parent.init_std
    assert not s["decoder.x_attn_layers_cm3.0.fc2.bias"].any()
    assert torch.equal(s["decoder.x_attn_layers_cm3.0.final_layer_norm.weight"], torch.ones(32))


def test_fresh_tensors_depend_on_seed_and_name_only():
    cfg = cross_of(tiny_cfg(), 1)
    a = fresh_tensor("decoder.x_attn_layers_llm.0.fc1.weight", (64, 32), cfg=cfg, seed=0)
    assert torch.equal(a, fresh_tensor("decoder.x_attn_layers_llm.0.fc1.weight", (64, 32), cfg=cfg, seed=0))
    assert not torch.equal(a, fresh_tensor("decoder.x_attn_layers_llm.0.fc1.weight", (64, 32), cfg=cfg, seed=1))
    assert not torch.equal(a, fresh_tensor("decoder.x_attn_layers_cm3.0.fc1.weight", (64, 32), cfg=cfg, seed=0))
    # Streaming order does not matter: a whole state built in reverse key order is identical.
    parent_cfg = tiny_cfg(layers=2)
    llm, img = _parents(parent_cfg)
    ccfg = cross_of(parent_cfg, 1, image_vocab_start=IMG_START, image_vocab_end=IMG_END)
    L, I = llm.state_dict(), img.state_dict()
    keys = list(state_shapes(ccfg))
    fwd = {k: cross_tensor(k, cfg=ccfg, llm=L.__getitem__, img=I.__getitem__, seed=3) for k in keys}
    rev = {k: cross_tensor(k, cfg=ccfg, llm=L.__getitem__, img=I.__getitem__, seed=3) for k in reversed(keys)}
    assert all(torch.equal(fwd[k], rev[k]) for k in keys)


def test_per_block_draws_depend_on_seed_name_and_block_only(monkeypatch):
    """The per-block scheme: any range of whole blocks drawn alone equals that range of the whole
    tensor's draw (so blocks can be drawn in any order, on any thread); each block has its own
    stream (no two blocks equal); it is not the per-tensor draw; the values are N(0, init_std)."""
    from jam_metaseq.fusion import cross as fc

    monkeypatch.setattr(fc, "DRAW_BLOCK", 64)
    cfg = cross_of(tiny_cfg(), 1)
    name, n = "decoder.x_attn_layers_llm.0.fc1.weight", 64 * 32
    whole = fc.draw_normal(name, n, torch.empty(n), cfg=cfg, seed=4, scheme="per-block")
    for start, stop in ((0, 64), (128, 640), (1984, 2048), (64, 2048)):
        part = fc.draw_normal(name, n, torch.empty(stop - start), cfg=cfg, seed=4, scheme="per-block", start=start)
        assert torch.equal(part, whole[start:stop]), (start, stop)
    blocks = whole.view(-1, 64)
    assert len({tuple(b.tolist()) for b in blocks}) == blocks.shape[0]
    assert not torch.equal(whole, fc.draw_normal(name, n, torch.empty(n), cfg=cfg, seed=4, scheme="per-tensor"))
    assert not torch.equal(whole, fc.draw_normal(name, n, torch.empty(n), cfg=cfg, seed=5, scheme="per-block"))
    assert 0.9 * cfg.parent.init_std < whole.std() < 1.1 * cfg.parent.init_std and abs(whole.mean()) < 2e-3
    with pytest.raises(ValueError, match="not whole blocks"):
        fc.draw_normal(name, n, torch.empty(10), cfg=cfg, seed=4, scheme="per-block", start=5)
    with pytest.raises(ValueError, match="init_seed_scheme must be one of"):
        fc.draw_normal(name, n, torch.empty(n), cfg=cfg, seed=4, scheme="per-thread")


def test_in_model_preserve_init_agrees_with_fresh_tensors():
    """JamCrossLM(cfg) with preserve and the streamed fresh tensors agree on the structured parts."""
    cfg = cross_of(tiny_cfg(layers=2), 1, cross_init="preserve")
    sd = JamCrossLM(cfg).state_dict()
    for k, v in sd.items():
        if k.startswith("decoder.x_attn_layers_") or k == "decoder.feature_projection.weight":
            fresh = fresh_tensor(k, tuple(v.shape), cfg=cfg, seed=0)
            if k.endswith(("out_proj.weight", "fc2.weight", "bias", "layer_norm.weight")) or "feature" in k:
                assert torch.equal(v, fresh), k
    E = 32
    assert torch.equal(sd["decoder.feature_projection.weight"], torch.cat([torch.eye(E), torch.eye(E)], 1) / 2)


def test_cross_tensor_rejects_bad_input():
    parent_cfg = tiny_cfg(layers=2)
    llm, img = _parents(parent_cfg)
    L, I = llm.state_dict(), img.state_dict()
    unset = cross_of(parent_cfg, 2)  # image range not set
    with pytest.raises(ValueError, match="image_vocab_start/end = -1/-1"):
        cross_tensor("decoder.embed_tokens.weight", cfg=unset, llm=L.__getitem__, img=I.__getitem__)
    ok = cross_of(parent_cfg, 2, image_vocab_start=IMG_START, image_vocab_end=IMG_END)
    with pytest.raises(KeyError, match="decoder.layers.0.fc1.weight: not a JAM-Cross tensor"):
        cross_tensor("decoder.layers.0.fc1.weight", cfg=ok, llm=L.__getitem__, img=I.__getitem__)


# ---------------------------------------------------------------- properties

@settings(max_examples=25, deadline=None)
@given(heads=st.integers(1, 4), head_dim=st.integers(1, 4), init=st.sampled_from(["copy", "average"]),
       seed=st.integers(0, 2**16))
def test_widened_qkv_heads_come_whole_from_one_parent(heads, head_dim, init, seed):
    """For any shape: in each of K, V, Q of the widened qkv, head h < H is the LLM's head h (left
    half of the inputs) and head H + h the image model's head h (Eq. 2/3 applied per block)."""
    E = heads * head_dim
    parent = tiny_cfg(embed_dim=E, heads=heads, ffn_dim=4, layers=1)
    g = torch.Generator().manual_seed(seed)
    llm, img = torch.randn(3 * E, E, generator=g), torch.randn(3 * E, E, generator=g)
    wide = widen_tensor("decoder.layers.0.self_attn.qkv_proj.weight", llm, img, parent=parent, init=init)
    assert wide.shape == (6 * E, 2 * E)
    w = wide.view(3, 2 * heads, head_dim, 2 * E)  # (K/V/Q, head, row in head, input)
    src_l, src_i = llm.view(3, heads, head_dim, E), img.view(3, heads, head_dim, E)
    assert torch.equal(w[:, :heads, :, :E], src_l)
    assert torch.equal(w[:, heads:, :, :E], src_i)
    right_l = src_l if init == "copy" else (src_l + src_i) / 2
    right_i = src_i if init == "copy" else (src_l + src_i) / 2
    assert torch.equal(w[:, :heads, :, E:], right_l)
    assert torch.equal(w[:, heads:, :, E:], right_i)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_merge_is_linear_and_exact_for_constant_parents(n, seed):
    """Weights summing to 1 map identical parents to themselves; merge is linear in each parent."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g) + 0.1
    w = (w / w.sum()).tolist()
    t = torch.randn(3, 5, generator=g)
    torch.testing.assert_close(merge_tensor("w", [t] * n, weights=w), t, atol=1e-6, rtol=1e-6)
    ts = [torch.randn(3, 5, generator=g) for _ in range(n)]
    expected = sum(wi * ti for wi, ti in zip(w, ts))
    torch.testing.assert_close(merge_tensor("w", ts, weights=w), expected, atol=1e-6, rtol=1e-6)

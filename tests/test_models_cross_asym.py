"""JAM-Cross between parents of different sizes (issue 17; the paper's stated future work, §2.1.3):
the config and its layer alignment, the key schema, a hand-computed rectangular cross attention,
no future leakage, cached decode (eager, static, graph fallback) equal to the full forward, and
the ``preserve`` init reproducing each parent in its branch.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _model_util import left_pad, pre_norm_hidden, randomize_, random_tokens, tiny_cfg
from jam_metaseq.fusion import cross_tensor, state_shapes
from jam_metaseq.models import DecoderLM, JamCrossLM, build_model, count_parameters, cross_of, keys
from jam_metaseq.models.config import CrossConfig, align_layer, config_from_json, config_to_json
from jam_metaseq.models.cross import CrossAttention
from jam_metaseq.models.decoder import build_context

torch.set_num_threads(1)
IMG_START, IMG_END = 64, 120  # image-code rows of the tiny vocab (128)

LLM = tiny_cfg(layers=4)  # E=32, F=64, 4 heads, 4 layers
SMALL = tiny_cfg(embed_dim=16, ffn_dim=48, heads=2, layers=2)  # narrower, shallower
WIDE_DEEP = tiny_cfg(embed_dim=48, ffn_dim=40, heads=3, layers=6)  # wider, deeper, other head dim
SAME_WIDTH = tiny_cfg(ffn_dim=40, heads=2, layers=3)  # same width: the shared embedding stays
SHAPES = {"img_small": SMALL, "img_wide_deep": WIDE_DEEP, "img_same_width": SAME_WIDTH}


def asym(img=SMALL, every=1, init="paper", llm=LLM) -> CrossConfig:
    return cross_of(llm, every, cross_init=init, image_vocab_start=IMG_START, image_vocab_end=IMG_END,
                    image_parent=img)


# ---- config and layer alignment ------------------------------------------------------------------
def test_parents_share_everything_but_their_shape():
    for field, value in (("vocab_size", 96), ("max_positions", 32), ("bias", False), ("activation", "gelu"),
                         ("scale_embedding", False)):
        with pytest.raises(ValueError, match=f"share {field}"):
            asym(dataclasses.replace(SMALL, **{field: value}))


def test_same_shape_is_the_symmetric_model():
    cfg = asym(dataclasses.replace(LLM, arch="jam_uniform"))
    sym = cross_of(LLM, 1, image_vocab_start=IMG_START, image_vocab_end=IMG_END)
    assert cfg.symmetric and cfg == sym and cfg.to_dict() == sym.to_dict() and "image_parent" not in cfg.to_dict()
    a = asym()
    assert not a.symmetric and config_from_json(config_to_json(a)) == a
    assert (a.llm, a.img, a.output_dim, a.shared_embedding) == (LLM, SMALL, 32, False)


def test_layer_alignment_hand_cases():
    # 4-layer LLM, 2-layer image parent: every layer of the shallower one, paired proportionally.
    assert asym(SMALL, 1).cross_pairs == [(1, 0), (3, 1)]
    assert asym(SMALL, 2).cross_pairs == [(1, 0)]
    # 4-layer LLM, 6-layer image parent: the LLM is the shallower one.
    assert asym(WIDE_DEEP, 1).cross_pairs == [(0, 0), (1, 2), (2, 3), (3, 5)]
    assert asym(WIDE_DEEP, 2).cross_pairs == [(0, 0), (2, 3)]
    assert asym(WIDE_DEEP, 0).cross_pairs == []
    # 32-layer 6.7B LLM with a 24-layer 1.3B-shaped image decoder, cross every 4 on the image side.
    big = cross_of(tiny_cfg(layers=32), 4, image_parent=tiny_cfg(layers=24))
    # (i+1)*32//24 - 1: 1-1, 160//24-1, 288//24-1, 416//24-1, 544//24-1, 672//24-1
    assert big.cross_pairs == [(0, 0), (5, 4), (11, 8), (16, 12), (21, 16), (27, 20)]
    assert len(big.cross_after) == 6


@settings(max_examples=200, deadline=None)
@given(shallow=st.integers(1, 48), extra=st.integers(0, 48))
def test_alignment_is_proportional_and_monotone(shallow, extra):
    deep = shallow + extra
    js = [align_layer(i, shallow=shallow, deep=deep) for i in range(shallow)]
    assert all(0 <= j < deep for j in js) and js == sorted(set(js))  # strictly increasing, in range
    assert js[-1] == deep - 1  # the last layers meet
    for i, j in enumerate(js):  # layer j ends at or before layer i's depth, the next one after it
        assert (j + 1) * shallow <= (i + 1) * deep < (j + 2) * shallow
    if extra == 0:
        assert js == list(range(shallow))


# ---- key schema, shapes, counts ------------------------------------------------------------------
shapes_st = st.builds(lambda e, h, f, l: tiny_cfg(embed_dim=e * h, heads=h, ffn_dim=f, layers=l),
                      st.integers(2, 6), st.integers(1, 3), st.integers(4, 40), st.integers(1, 5))


@settings(max_examples=30, deadline=None)
@given(llm=shapes_st, img=shapes_st, every=st.integers(0, 3), bias=st.booleans(), affine=st.booleans(),
       init=st.sampled_from(["paper", "preserve"]))
def test_schema_names_every_tensor_of_an_asymmetric_model(llm, img, every, bias, affine, init):
    llm = dataclasses.replace(llm, bias=bias, affine_ln=affine)
    img = dataclasses.replace(img, bias=bias, affine_ln=affine)
    cfg = asym(img, every, init, llm=llm)
    with torch.device("meta"):
        model = build_model(cfg)
    sd = model.state_dict()
    assert keys.state_keys(cfg) == list(sd)
    for template, rule in keys.templates(cfg):
        assert keys.rule_for(template.format(i=0)) == rule
    n, a, b = len(cfg.cross_pairs), cfg.llm.embed_dim, cfg.img.embed_dim
    if n:
        assert tuple(sd["decoder.x_attn_layers_llm.0.cross_attn.k_proj.weight"].shape) == (a, b)
        assert tuple(sd["decoder.x_attn_layers_cm3.0.cross_attn.v_proj.weight"].shape) == (b, a)
        assert tuple(sd["decoder.x_attn_layers_cm3.0.fc1.weight"].shape) == (cfg.img.ffn_dim, b)
    assert tuple(sd[keys.FEATURE_PROJECTION].shape) == (max(a, b), a + b)
    assert (keys.EMBED in sd) == (a == b) and (keys.BRANCH_EMBED["img"] in sd) == (a != b)
    tied = model.decoder.output_projection.weight is getattr(model.decoder, "embed_tokens", None).weight \
        if a == b else False
    assert tied == (a == b)


def _by_hand_count(cfg: CrossConfig) -> int:
    V, P = cfg.vocab_size, cfg.llm.num_position_rows

    def layer(E, F):  # qkv + out + 2 LN + fc1 + fc2 (biases, affine LN)
        return 3 * E * E + 3 * E + E * E + E + 4 * E + E * F + F + F * E + E

    def cross_block(E, O, F):  # q, k (from O), v (from O), out + 2 LN + FFN
        return E * E + E + 2 * (O * E + E) + E * E + E + 4 * E + E * F + F + F * E + E

    a, b, W = cfg.llm, cfg.img, cfg.output_dim
    n = len(cfg.cross_pairs)
    embed = V * a.embed_dim if cfg.shared_embedding else V * (a.embed_dim + b.embed_dim) + V * W
    return (embed + P * (a.embed_dim + b.embed_dim) + a.layers * layer(a.embed_dim, a.ffn_dim)
            + b.layers * layer(b.embed_dim, b.ffn_dim) + n * cross_block(a.embed_dim, b.embed_dim, a.ffn_dim)
            + n * cross_block(b.embed_dim, a.embed_dim, b.ffn_dim) + W * (a.embed_dim + b.embed_dim) + 2 * W)


@pytest.mark.parametrize("img", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("every", [1, 2, 0])
def test_parameter_count_on_the_meta_device_is_the_hand_count(img, every):
    cfg = asym(img, every)
    assert count_parameters(cfg) == _by_hand_count(cfg)
    assert count_parameters(cross_of(LLM, every)) == _by_hand_count(cross_of(LLM, every))  # the formula's control


# ---- rectangular cross attention by hand -----------------------------------------------------------
def test_rectangular_cross_attention_hand_case():
    """Query width 2 (one head), keys/values from a width-3 branch, two positions, causal."""
    cfg = tiny_cfg(embed_dim=2, heads=1, ffn_dim=4, layers=1, bias=False)
    attn = CrossAttention(cfg, slot=0, other_dim=3)
    with torch.no_grad():
        attn.q_proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        attn.k_proj.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))  # (2, 3): rectangular
        attn.v_proj.weight.copy_(torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]))
        attn.out_proj.weight.copy_(torch.eye(2))
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, 2, 2) queries' branch
    other = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]]])  # (1, 2, 3) the other branch
    tokens = torch.tensor([[5, 6]])
    out = attn(x, other, build_context(tokens, padding_idx=1, cache=None))
    # k = [[1, 0], [0, 2]], v = [[2, 1], [1, 1]]; position 0 sees key 0 only: v0 = [2, 1].
    # Position 1: q = [0, 2], scores q.k / sqrt(2) = [0, 4/sqrt(2)]; softmax weights w = [1-p, p].
    p = torch.sigmoid(torch.tensor(4 / 2**0.5))
    want = torch.stack([torch.tensor([2.0, 1.0]), (1 - p) * torch.tensor([2.0, 1.0]) + p * torch.tensor([1.0, 1.0])])
    torch.testing.assert_close(out[0], want, atol=1e-6, rtol=0)


# ---- no future leakage ---------------------------------------------------------------------------
def _embedding_grads(model, tokens: torch.Tensor, t: int) -> list[torch.Tensor]:
    """d(random projection of the logits at t)/d(every token-embedding lookup's output)."""
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    tables = [m for n, m in model.decoder.named_children() if n.startswith("embed_tokens")]
    handles = [m.register_forward_hook(hook) for m in tables]
    try:
        logits = model(tokens)
    finally:
        for h in handles:
            h.remove()
    w = torch.randn(logits.shape[0], logits.shape[-1], generator=torch.Generator().manual_seed(t))
    return list(torch.autograd.grad((logits[:, t] * w).sum(), captured))


@pytest.mark.parametrize("img", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_logits_at_t_ignore_later_inputs(img, padded):
    cfg = asym(img, 1)
    model = randomize_(build_model(cfg), seed=3).eval()
    T = 9
    if padded:
        tokens = left_pad([random_tokens(1, n, low=0, high=128, seed=n)[0] for n in (T, T - 3)], padding_idx=1)
    else:
        tokens = random_tokens(2, T, low=0, high=128, seed=4)
    for t in range(T):
        grads = _embedding_grads(model, tokens, t)
        assert len(grads) == (1 if cfg.shared_embedding else 2)
        for g in grads:
            assert torch.count_nonzero(g[:, t + 1:]) == 0, f"position {t} sees the future"
            assert g[tokens[:, t].ne(1), t].abs().sum() > 0


@pytest.mark.parametrize("img", list(SHAPES.values()), ids=list(SHAPES))
def test_every_rectangular_cross_block_is_causal_in_both_inputs(img):
    cfg = asym(img, 1)
    model = randomize_(build_model(cfg), seed=5).eval()
    d, T = model.decoder, 8
    blocks = [(b, cfg.llm.embed_dim, cfg.img.embed_dim) for b in d.x_attn_layers_llm]
    blocks += [(b, cfg.img.embed_dim, cfg.llm.embed_dim) for b in d.x_attn_layers_cm3]
    assert len(blocks) == 2 * len(cfg.cross_pairs) > 0
    tokens = left_pad([random_tokens(1, T, low=4, high=128, seed=1)[0],
                       random_tokens(1, 5, low=4, high=128, seed=2)[0]], padding_idx=1)
    ctx = build_context(tokens, padding_idx=1, cache=None)
    g = torch.Generator().manual_seed(0)
    for block, own, other_dim in blocks:
        x = torch.randn(2, T, own, generator=g, requires_grad=True)
        other = torch.randn(2, T, other_dim, generator=g, requires_grad=True)
        out = block(x, other, ctx)
        for t in range(T):
            gx, go = torch.autograd.grad(out[:, t].sum(), (x, other), retain_graph=True)
            assert torch.count_nonzero(gx[:, t + 1:]) == 0 and torch.count_nonzero(go[:, t + 1:]) == 0
            assert go[0, : t + 1].abs().sum() > 0  # it does read the other branch's past


# ---- cached decode == full forward -----------------------------------------------------------------
@pytest.mark.parametrize("img", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("every", [1, 2])
def test_cached_decode_equals_full_forward(img, every):
    model = randomize_(build_model(asym(img, every)), seed=11).eval()
    tokens = left_pad([random_tokens(1, 12, low=0, high=128, seed=2)[0],
                       random_tokens(1, 8, low=0, high=128, seed=3)[0]], padding_idx=1)
    B, T = tokens.shape
    with torch.no_grad():
        full = model(tokens)
        for chunks in ([1] * T, [5, 1, 4, 2]):
            cache = model.setup_caches(B, T + 2)
            out, s = [], 0
            for n in chunks:
                out.append(model(tokens[:, s:s + n], cache=cache))
                s += n
            torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=0)
        # static steps (fixed key span) after a prefill
        cache = model.setup_caches(B, T + 2)
        out = [model(tokens[:, :4], cache=cache)]
        for s in range(4, T):
            out.append(model(tokens[:, s:s + 1], cache=cache, span=cache.max_len))
        torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=0)


def test_cache_slots_have_each_branchs_heads():
    model = build_model(asym(WIDE_DEEP, 1))
    cache = model.setup_caches(2, 5)
    shapes = sorted((tuple(b.shape[0:1]) + tuple(b.shape[2:3]) + tuple(b.shape[4:])) for b in cache.buffers()[:2])
    # LLM: 4 self + 4 cross slots of (4 heads, 8); image: 6 self + 4 cross of (3 heads, 16)
    assert shapes == [(8, 4, 8), (10, 3, 16)]


@pytest.mark.parametrize("img", [SMALL, WIDE_DEEP], ids=["img_small", "img_wide_deep"])
def test_eager_static_and_graph_fallback_decode_agree(img):
    from _generation_util import PROMPTS, VOCAB, float64
    from jam_metaseq.generation.engine import Engine, GenerationConfig

    llm = tiny_cfg(vocab_size=VOCAB.size, max_positions=96, init_std=0.3, layers=4)
    img = dataclasses.replace(img, vocab_size=VOCAB.size, max_positions=96, init_std=0.3)
    cfg = cross_of(llm, 1, image_vocab_start=VOCAB.image_start, image_vocab_end=VOCAB.image_end, image_parent=img)
    torch.manual_seed(0)
    model = float64(build_model(cfg).eval())
    gen = GenerationConfig(max_new_tokens=VOCAB.image_tokens_per_image + 10, min_images=1)
    runs = {}
    for decode in ("eager", "static", "graph"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # graph off CUDA falls back to static with a warning
            e = Engine(model, vocab=VOCAB, decode=decode, key_block=8)
        runs[decode] = [a.ids for a in e.generate(PROMPTS, config=gen, seeds=[7, 8, 9])]
    assert runs["static"] == runs["eager"] == runs["graph"]
    assert any(VOCAB.image_start <= t < VOCAB.image_end for ids in runs["eager"] for t in ids)  # an image was made


# ---- init ----------------------------------------------------------------------------------------
def test_fresh_parameters_of_a_meta_model_are_build_models():
    """The metaseq host builds its tensor-parallel parts from this stream."""
    from jam_metaseq.models import fresh_parameters

    for img in SHAPES.values():
        cfg = asym(img, 1, "preserve")
        torch.manual_seed(3)
        want = build_model(cfg)
        torch.manual_seed(3)
        with torch.device("meta"):
            meta = build_model(cfg)
        got = list(fresh_parameters(meta, cfg))
        assert [k for k, _ in got] == [k for k, _ in want.named_parameters()]
        assert all(torch.equal(v, p.detach()) for (_, v), p in zip(got, want.parameters()))
        fp = dict(want.named_parameters())[keys.FEATURE_PROJECTION].detach()
        a, b, W = cfg.llm.embed_dim, cfg.img.embed_dim, cfg.output_dim
        assert torch.equal(fp, torch.cat([torch.eye(W, b), torch.eye(W, a)], 1) / 2)


def _parents(img_cfg):
    llm = randomize_(DecoderLM(LLM), seed=1).eval()
    img = randomize_(DecoderLM(img_cfg), seed=2).eval()
    return llm, img




def _fused(cfg, llm, img, seed=0):
    L, I = llm.state_dict(), img.state_dict()
    model = JamCrossLM(cfg).eval()
    model.load_state_dict({k: cross_tensor(k, cfg=cfg, llm=L.__getitem__, img=I.__getitem__, seed=seed)
                           for k in state_shapes(cfg)}, strict=True)
    return model


@pytest.mark.parametrize("img", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("every", [1, 2])
def test_preserve_init_reproduces_each_parent_in_its_branch(img, every):
    llm, imgm = _parents(img)
    fused = _fused(asym(img, every, "preserve"), llm, imgm)
    text = random_tokens(2, 10, low=4, high=IMG_START, seed=3)
    image = random_tokens(2, 10, low=IMG_START, high=IMG_END, seed=4)
    mixed = random_tokens(2, 10, low=4, high=128, seed=5)
    with torch.no_grad():
        x_llm, _ = fused.branch_features(text)
        _, x_img = fused.branch_features(image)
    torch.testing.assert_close(x_llm, pre_norm_hidden(llm, text), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_img, pre_norm_hidden(imgm, image), atol=1e-5, rtol=0)
    if img.embed_dim != LLM.embed_dim:  # own embeddings: each branch is its parent on any tokens
        with torch.no_grad():
            x_llm, x_img = fused.branch_features(mixed)
            feats = fused.extract_features(mixed)
        torch.testing.assert_close(x_llm, pre_norm_hidden(llm, mixed), atol=1e-5, rtol=0)
        torch.testing.assert_close(x_img, pre_norm_hidden(imgm, mixed), atol=1e-5, rtol=0)
        W = max(LLM.embed_dim, img.embed_dim)
        pad = lambda x: torch.nn.functional.pad(x, (0, W - x.shape[-1]))  # noqa: E731
        torch.testing.assert_close(feats, fused.decoder.layer_norm((pad(x_llm) + pad(x_img)) / 2), atol=1e-6, rtol=0)
    # control: paper init mixes the branches
    paper = _fused(asym(img, every, "paper"), llm, imgm)
    with torch.no_grad():
        assert (paper.branch_features(text)[0] - pre_norm_hidden(llm, text)).abs().max() > 1e-3


def test_output_head_and_final_norm_of_two_widths():
    """Text rows of the head from the LLM, image rows from the image parent, zero-padded to the
    wider width; the final LayerNorm averaged where both parents have coordinates."""
    for img in (SMALL, WIDE_DEEP):
        llm, imgm = _parents(img)
        L, I = llm.state_dict(), imgm.state_dict()
        cfg = asym(img, 1)
        head = cross_tensor(keys.OUTPUT, cfg=cfg, llm=L.__getitem__, img=I.__getitem__)
        a, b, W = LLM.embed_dim, img.embed_dim, cfg.output_dim
        assert head.shape == (128, W)
        assert torch.equal(head[:IMG_START, :a], L[keys.EMBED][:IMG_START]) and not head[:IMG_START, a:].any()
        assert torch.equal(head[IMG_START:IMG_END, :b], I[keys.EMBED][IMG_START:IMG_END])
        assert not head[IMG_START:IMG_END, b:].any()
        assert torch.equal(head[IMG_END:, :a], L[keys.EMBED][IMG_END:])
        for side, sd in (("llm", L), ("img", I)):
            got = cross_tensor(keys.BRANCH_EMBED[side], cfg=cfg, llm=L.__getitem__, img=I.__getitem__)
            assert torch.equal(got, sd[keys.EMBED])
        norm = cross_tensor("decoder.layer_norm.weight", cfg=cfg, llm=L.__getitem__, img=I.__getitem__)
        m = min(a, b)
        wider = L if a > b else I
        torch.testing.assert_close(norm[:m], (L["decoder.layer_norm.weight"][:m] + I["decoder.layer_norm.weight"][:m]) / 2)
        assert torch.equal(norm[m:], wider["decoder.layer_norm.weight"][m:])


def test_readme_counts_of_a_6_7b_llm_with_a_1_3b_image_decoder():
    """The README's table (``jam params``): the hand count of each config, and the meta-device
    count for one of them (building all on the meta device takes seconds each)."""
    from jam_metaseq.cli import params_table
    from jam_metaseq.models import preset

    readme = {1: 14_045_696_000, 2: 11_125_501_952, 4: 9_665_404_928, 0: 8_205_307_904}
    for every, n in readme.items():
        cfg = cross_of(preset("opt_6_7b"), every, image_parent=preset("opt_1_3b"))
        assert _by_hand_count(cfg) == n, every
        swapped = cross_of(preset("opt_1_3b"), every, image_parent=preset("opt_6_7b"))
        assert _by_hand_count(swapped) == n, every
    (row,) = params_table("opt_6_7b", "opt_1_3b", [4])
    assert row["params"] == readme[4] and row["pairs"] == "0:0 5:4 11:8 16:12 21:16 27:20"

"""State-dict layout, configs and parameter counts of the core models (paper §2.1, §3.1).

Keys and shapes must be exactly metaseq's (docs/CHECKPOINTS.md) so metaseq checkpoints load with
``strict=True``; JAM-Cross uses the authors' prototype names. Parameter counts, built on the meta
device, must reproduce the paper's figures (7B parents, 26B JAM-Width, 13/16/19/26B JAM-Cross).
"""

from __future__ import annotations

import math

import pytest
import torch

from _model_util import randomize_, tiny_cfg
from jam_metaseq.models import (
    PRESETS, CrossConfig, DecoderConfig, DecoderLM, JamCrossLM, build_model, config_from_json,
    config_to_json, count_parameters, cross_of, preset, uniform_of, width_of,
)
from jam_metaseq.models.decoder import metaseq_positions

# docs/CHECKPOINTS.md: one layer's keys; (optional) = present only with biases / affine LayerNorm.
LAYER_KEYS = {
    "self_attn.qkv_proj.weight": ("3E", "E"),
    "self_attn.qkv_proj.bias": ("3E",),
    "self_attn.out_proj.weight": ("E", "E"),
    "self_attn.out_proj.bias": ("E",),
    "self_attn_layer_norm.weight": ("E",),
    "self_attn_layer_norm.bias": ("E",),
    "fc1.weight": ("F", "E"),
    "fc1.bias": ("F",),
    "fc2.weight": ("E", "F"),
    "fc2.bias": ("E",),
    "final_layer_norm.weight": ("E",),
    "final_layer_norm.bias": ("E",),
}
TOP_KEYS = {
    "decoder.version": (1,),
    "decoder.embed_tokens.weight": ("V", "E"),
    "decoder.embed_positions.weight": ("P", "E"),
    "decoder.layer_norm.weight": ("E",),
    "decoder.layer_norm.bias": ("E",),
    "decoder.output_projection.weight": ("V", "E"),
}


def _is_bias(key: str) -> bool:
    return key.endswith("bias") and "layer_norm" not in key


def _expected_keys(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    dims = {"E": cfg.embed_dim, "3E": 3 * cfg.embed_dim, "F": cfg.ffn_dim, "V": cfg.vocab_size,
            "P": cfg.max_positions + 2}

    def keep(key: str) -> bool:
        if not cfg.bias and _is_bias(key):
            return False
        return cfg.affine_ln or "layer_norm" not in key

    out = {k: tuple(dims.get(d, d) for d in s) for k, s in TOP_KEYS.items() if keep(k)}
    for i in range(cfg.layers):
        out.update({f"decoder.layers.{i}.{k}": tuple(dims[d] for d in s) for k, s in LAYER_KEYS.items() if keep(k)})
    return out


@pytest.mark.parametrize(
    "overrides", [{}, {"bias": False}, {"affine_ln": False}, {"bias": False, "affine_ln": False}],
    ids=["full", "no-bias", "no-affine-ln", "cm3leon-like"],
)
def test_decoder_state_dict_is_metaseq_layout(overrides):
    cfg = tiny_cfg(**overrides)
    sd = DecoderLM(cfg).state_dict()
    expected = _expected_keys(cfg)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert torch.equal(sd["decoder.version"], torch.tensor([3.0]))


def test_disable_flags_remove_the_right_keys():
    full = set(DecoderLM(tiny_cfg()).state_dict())
    no_bias = set(DecoderLM(tiny_cfg(bias=False)).state_dict())
    no_ln = set(DecoderLM(tiny_cfg(affine_ln=False)).state_dict())
    assert full - no_bias == {k for k in full if _is_bias(k)}
    assert all(k.split(".")[-2] in ("qkv_proj", "out_proj", "fc1", "fc2") for k in full - no_bias)
    assert full - no_ln == {k for k in full if "layer_norm" in k}
    assert "decoder.layer_norm.weight" in full - no_ln


def test_output_projection_is_tied_and_loads_from_a_metaseq_dict():
    cfg = tiny_cfg()
    model = DecoderLM(cfg)
    assert model.decoder.output_projection.weight is model.decoder.embed_tokens.weight
    donor = randomize_(DecoderLM(cfg), seed=1)
    sd = {k: v.clone() for k, v in donor.state_dict().items()}  # untied copies, as in a checkpoint
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.decoder.output_projection.weight, sd["decoder.embed_tokens.weight"])
    # Missing the version buffer (as a sloppy converter would write) is a strict-load error.
    del sd["decoder.version"]
    with pytest.raises(RuntimeError, match="version"):
        model.load_state_dict(sd, strict=True)


def test_qkv_rows_are_k_v_q():
    """The fused projection is split [K; V; Q]: putting the Q rows first changes the function."""
    cfg = tiny_cfg()
    model = randomize_(DecoderLM(cfg), seed=2).eval()
    tokens = torch.randint(4, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    layer = model.decoder.layers[0].self_attn
    x = torch.randn(1, 7, cfg.embed_dim)
    E = cfg.embed_dim
    W, b = layer.qkv_proj.weight.detach(), layer.qkv_proj.bias.detach()
    k, v, q = (x @ W[i * E : (i + 1) * E].T + b[i * E : (i + 1) * E] for i in range(3))
    H, D = cfg.heads, cfg.head_dim
    split = lambda t: t.view(1, 7, H, D).transpose(1, 2)  # noqa: E731
    att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(D) + torch.full((7, 7), -math.inf).triu(1), -1)
    ref = layer.out_proj((att @ split(v)).transpose(1, 2).reshape(1, 7, E))
    from jam_metaseq.models.decoder import build_context

    with torch.no_grad():
        got = layer(x, build_context(tokens, padding_idx=1, cache=None))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_positions_follow_metaseq_offset():
    """Hand case: positions count non-pad tokens, the first real token gets row padding_idx + 1 = 2."""
    tokens = torch.tensor([[1, 1, 5, 6], [5, 6, 7, 8], [1, 9, 1, 9]])
    pos = metaseq_positions(tokens, padding_idx=1, cache=None, max_positions=8)
    assert pos.tolist() == [[1, 1, 2, 3], [2, 3, 4, 5], [1, 2, 1, 3]]
    with pytest.raises(ValueError, match="max_positions=3"):
        metaseq_positions(tokens, padding_idx=1, cache=None, max_positions=3)
    cfg = tiny_cfg(max_positions=8)
    assert DecoderLM(cfg).decoder.embed_positions.weight.shape[0] == 10  # max + 2 rows


def test_embedding_scale():
    """scale_embedding multiplies token embeddings by sqrt(E): same features as pre-scaled weights."""
    cfg = tiny_cfg()
    scaled = randomize_(DecoderLM(cfg), seed=3).eval()
    plain = DecoderLM(tiny_cfg(scale_embedding=False)).eval()
    sd = {k: v.clone() for k, v in scaled.state_dict().items()}
    sd["decoder.embed_tokens.weight"] = sd["decoder.embed_tokens.weight"] * math.sqrt(cfg.embed_dim)
    sd["decoder.output_projection.weight"] = sd["decoder.embed_tokens.weight"]
    plain.load_state_dict(sd, strict=True)
    tokens = torch.randint(4, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(plain.extract_features(tokens), scaled.extract_features(tokens), atol=1e-5, rtol=0)
        assert (plain(tokens) - scaled(tokens)).abs().max() > 1e-2  # the tied output sees the scaling


@pytest.mark.parametrize("every,pairs", [(1, 4), (2, 2), (3, 2), (4, 1), (0, 0)])
def test_cross_layout(every, pairs):
    parent = tiny_cfg(layers=4, bias=False, affine_ln=False)
    cfg = cross_of(parent, every)
    assert len(cfg.cross_after) == pairs
    sd = JamCrossLM(cfg).state_dict()
    assert torch.equal(sd["decoder.version"], torch.tensor([3.0]))
    E, F, V, P = 32, 64, 128, parent.max_positions + 2
    assert sd["decoder.embed_tokens.weight"].shape == (V, E)
    assert sd["decoder.output_projection.weight"].shape == (V, E)
    assert sd["decoder.embed_positions_llm.weight"].shape == (P, E)
    assert sd["decoder.embed_positions_cm3.weight"].shape == (P, E)
    assert sd["decoder.feature_projection.weight"].shape == (E, 2 * E)  # (E x 2E), no bias
    assert "decoder.feature_projection.bias" not in sd
    parent_layer = {k.split(".", 3)[3]: v.shape for k, v in DecoderLM(parent).state_dict().items()
                    if k.startswith("decoder.layers.0.")}
    for branch in ("llm", "cm3"):
        for i in range(4):
            layer = {k.split(".", 3)[3]: v.shape for k, v in sd.items() if k.startswith(f"decoder.layers_{branch}.{i}.")}
            assert layer == parent_layer  # each branch layer is a normal decoder layer
        blocks = {int(k.split(".")[2]) for k in sd if k.startswith(f"decoder.x_attn_layers_{branch}.")}
        assert blocks == set(range(pairs))
        for j in range(pairs):
            block = {k.split(".", 3)[3]: tuple(v.shape) for k, v in sd.items()
                     if k.startswith(f"decoder.x_attn_layers_{branch}.{j}.")}
            # No biases, no affine LN in this parent: separate q/k/v/out projections and an FFN.
            assert block == {
                "cross_attn.q_proj.weight": (E, E), "cross_attn.k_proj.weight": (E, E),
                "cross_attn.v_proj.weight": (E, E), "cross_attn.out_proj.weight": (E, E),
                "fc1.weight": (F, E), "fc2.weight": (E, F),
            }
    model = JamCrossLM(cfg)
    assert model.decoder.output_projection.weight is model.decoder.embed_tokens.weight


def test_cross_after_layers():
    parent = tiny_cfg(layers=6)
    assert cross_of(parent, 2).cross_after == [0, 2, 4]
    assert cross_of(parent, 1).cross_after == list(range(6))
    assert cross_of(parent, 4).cross_after == [0, 4]
    assert cross_of(parent, 0).cross_after == []
    with pytest.raises(ValueError):
        cross_of(parent, -1)


@pytest.mark.parametrize(
    "cfg",
    [tiny_cfg(), width_of(tiny_cfg()), uniform_of(tiny_cfg()),
     cross_of(tiny_cfg(), 2, cross_init="preserve", image_vocab_start=64, image_vocab_end=120)],
    ids=["decoder", "width", "uniform", "cross"],
)
def test_config_json_round_trip(cfg):
    back = config_from_json(config_to_json(cfg))
    assert back == cfg
    assert type(build_model(back)) is type(build_model(cfg))


def test_width_config_doubles_width_and_keeps_head_dim():
    parent = preset("cm3leon_7b")
    w = width_of(parent)
    assert (w.embed_dim, w.ffn_dim, w.heads, w.layers) == (8192, 32768, 64, 32)
    assert w.head_dim == parent.head_dim == 128
    assert (w.vocab_size, w.bias, w.affine_ln) == (parent.vocab_size, False, False)


def test_cm3leon_preset_matches_the_paper():
    """§3.1: 32 layers, hidden 4096, 32 heads, FFN 16384, no biases, no dropout, no affine LayerNorm."""
    p = PRESETS["cm3leon_7b"]
    assert (p.layers, p.embed_dim, p.heads, p.ffn_dim) == (32, 4096, 32, 16384)
    assert (p.bias, p.affine_ln, p.dropout, p.attention_dropout) == (False, False, 0.0, 0.0)


# Paper §2.1.2 / §3.3 Table 4: the figures as written (billions).
PAPER_SIZES = [
    ("parent", lambda p: p, 6.7),
    ("width", width_of, 26),
    ("cross_none", lambda p: cross_of(p, 0), 13),
    ("cross_every_4", lambda p: cross_of(p, 4), 16),
    ("cross_every_2", lambda p: cross_of(p, 2), 19),
    ("cross_every_1", lambda p: cross_of(p, 1), 26),
]


@pytest.mark.parametrize("name,make,billions", PAPER_SIZES, ids=[s[0] for s in PAPER_SIZES])
def test_parameter_counts_match_the_paper(name, make, billions):
    n = count_parameters(make(PRESETS["cm3leon_7b"]))
    # Within ~3.5% (cross_every_2 is 19.6B, printed as 19B), and truncated to the paper's digits.
    assert abs(n / 1e9 - billions) / billions < 0.035, f"{name}: {n / 1e9:.2f}B"
    digits = 1 if billions < 10 else 0
    assert math.floor(n / 1e9 * 10**digits) / 10**digits == billions


def test_count_parameters_by_hand():
    """Tiny decoder counted by hand: tied embedding once, positions max+2 rows."""
    cfg = tiny_cfg()
    E, F, V, L, P = 32, 64, 128, 2, 66
    layer = 3 * E * E + 3 * E + E * E + E + 2 * E + F * E + F + E * F + E + 2 * E
    assert count_parameters(cfg) == V * E + P * E + L * layer + 2 * E
    no_bias_ln = tiny_cfg(bias=False, affine_ln=False)
    assert count_parameters(no_bias_ln) == V * E + P * E + L * (4 * E * E + 2 * E * F)
    cross = cross_of(no_bias_ln, 1)
    block = 4 * E * E + 2 * E * F
    assert count_parameters(cross) == V * E + 2 * P * E + 2 * L * block + 2 * L * block + 2 * E * E
    assert isinstance(cross, CrossConfig)

"""The Llama family (issue 23) against its reference implementation: HF ``transformers``'
``LlamaForCausalLM``, ``Qwen2ForCausalLM`` and ``GemmaForCausalLM`` with tiny random configs built
here, their weights mapped into ours through ``jam_metaseq.models.hf_families``.

Our logits equal HF's (fp32 round-off), unpadded, left-padded and decoded through the KV cache;
HF -> ours -> HF state dicts and configs are bit-identical; a model of ours written as an HF
config + state dict loads in ``transformers`` and computes the same; a model-parallel forward over
MP=2 pieces cut by the key schema's rules (``checkpoints_tools.layout``) equals MP=1. Negative
controls: the interleaved rotary layout, a wrong k/v head grouping and a wrong MP split of k/v
all break the parity, so these tests can fail.
"""

from __future__ import annotations

import copy

import pytest
import torch

from _model_util import left_pad, random_tokens
from jam_metaseq.models import build_model, hf_families, keys, preset
from jam_metaseq.models.config import DecoderConfig
from jam_metaseq.models.decoder import build_context, rotary_context

transformers = pytest.importorskip("transformers")
from _hf_util import CASES, MAIN, V, hf_model, ours_from  # noqa: E402 (needs transformers)

torch.set_num_threads(1)
ATOL = 1e-5


@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
    hf = hf_model(request.param)
    ours, cfg = ours_from(hf)
    return request.param, hf, ours, cfg


def test_family_configs_are_the_tiny_presets():
    for case in MAIN:
        cfg = hf_families.config_from_hf(hf_model(case).config.to_dict())
        assert cfg == preset(f"{case}_tiny"), case


def test_logits_match_hf(pair):
    case, hf, ours, cfg = pair
    tokens = random_tokens(3, 20, low=0, high=V, seed=1)
    with torch.no_grad():
        ref, got = hf(input_ids=tokens).logits, ours(tokens)
    assert ref.abs().max() > 0.1  # not two near-zero tensors
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def _hf_left_padded(hf, tokens: torch.Tensor, pad: int) -> torch.Tensor:
    """HF logits of left-padded rows: attention mask and per-row positions (HF generate's rule)."""
    mask = tokens.ne(pad).long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        return hf(input_ids=tokens, attention_mask=mask, position_ids=positions).logits


def _cached(model, tokens: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    cache = model.setup_caches(tokens.shape[0], tokens.shape[1])
    out, start = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(model(tokens[:, start:start + n], cache=cache))
            start += n
    return torch.cat(out, dim=1)


def test_left_padded_and_cached_decoding_match_hf(pair):
    """Left-padded prompts (one row unpadded) and 4 generated tokens: our full forward and our KV-cache
    decoding (prefill, then one token per step) equal HF's logits on every real token."""
    case, hf, ours, cfg = pair
    pad = cfg.padding_idx
    rows = [random_tokens(1, n, low=0, high=V, seed=30 + n)[0] for n in (9, 4, 1)]
    tokens = torch.cat([left_pad(rows, padding_idx=pad), random_tokens(3, 4, low=0, high=V, seed=5)], dim=1)
    real = tokens.ne(pad)
    ref = _hf_left_padded(hf, tokens, pad)
    with torch.no_grad():
        full = ours(tokens)
    torch.testing.assert_close(full[real], ref[real], atol=ATOL, rtol=0)
    stepped = _cached(ours, tokens, [9, 1, 1, 1, 1])
    torch.testing.assert_close(stepped[real], ref[real], atol=ATOL, rtol=0)
    assert ours.setup_caches(1, 4).k.shape[2] == cfg.num_kv_heads  # the cache holds k/v heads, not query heads
    with torch.no_grad():  # the padded row is the row alone
        torch.testing.assert_close(full[2, -5:], ours(tokens[2:, -5:])[0], atol=ATOL, rtol=0)


def test_hf_to_ours_to_hf_is_bit_identical(pair):
    case, hf, ours, cfg = pair
    hf_state = {k: v for k, v in hf.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    back = hf_families.to_hf_state(ours.state_dict(), cfg)
    assert set(back) == set(hf_state)  # (in our state-dict order; HF lists the MLP before the norms)
    assert all(torch.equal(back[k], hf_state[k]) for k in hf_state)
    assert [hf_families.hf_name(k, cfg) for k in keys.state_keys(cfg) if hf_families.hf_name(k, cfg)] == list(back)


def test_written_config_loads_in_transformers_and_computes_the_same(pair):
    """Ours -> ``hf_config`` + ``to_hf_state`` -> the family's HF class (no custom code) -> the same
    logits and, read back, the same config (the inverse of ``config_from_hf``)."""
    case, hf, ours, cfg = pair
    written = hf_families.hf_config(cfg)
    cls = getattr(transformers, written["architectures"][0])
    config = transformers.AutoConfig.for_model(written["model_type"]).from_dict(written)
    assert hf_families.config_from_hf(config.to_dict()) == cfg
    reloaded = cls._from_config(config, attn_implementation="sdpa").eval()
    missing, unexpected = reloaded.load_state_dict(hf_families.to_hf_state(ours.state_dict(), cfg), strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if cfg.tie_embeddings else set())
    tokens = random_tokens(2, 12, low=0, high=V, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tokens).logits, ours(tokens), atol=ATOL, rtol=0)


def test_gemma_embedding_scale_is_rounded_to_the_model_dtype_as_hf_does():
    """In bf16 HF Gemma multiplies by sqrt(E) rounded to bf16 (sqrt(32) = 5.65625, not 5.6569):
    our embedding equals its bit for bit; without the rounding (metaseq's full-precision scale) it
    does not."""
    hf = hf_model("gemma").to(torch.bfloat16)
    ours, cfg = ours_from(hf)
    ours = ours.to(torch.bfloat16)
    tokens = random_tokens(2, 16, low=0, high=V, seed=4)
    with torch.no_grad():
        ref = hf.model.embed_tokens(tokens)
        assert torch.equal(ours.decoder.embed(tokens, None, None), ref)
        ours.cfg.embed_scale_in_dtype = False  # the control
        assert not torch.equal(ours.decoder.embed(tokens, None, None), ref)


# ---- negative controls ---------------------------------------------------------------------------
def _interleaved(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q/k rows of each head from the half-split order (i, i + D/2 pairs) to the interleaved one
    (2i, 2i + 1 pairs: Meta's original checkpoints)."""
    D = head_dim
    perm = torch.stack([torch.arange(D // 2), torch.arange(D // 2) + D // 2], dim=1).reshape(-1)
    return w.view(-1, D, *w.shape[1:])[:, perm].reshape(w.shape)


def _diff_after(case: str, edit) -> float:
    hf = hf_model(case)
    ours, cfg = ours_from(hf)
    state = ours.state_dict()
    edit(state, cfg)
    ours.load_state_dict(state, strict=True)
    tokens = random_tokens(2, 16, low=0, high=V, seed=1)
    with torch.no_grad():
        return float((ours(tokens) - hf(input_ids=tokens).logits).abs().max())


@pytest.mark.parametrize("case", ["llama", "gemma"])
def test_interleaved_rotary_layout_breaks_parity(case):
    def interleave(state, cfg):
        for i in range(cfg.layers):
            for proj in (keys.Q_PROJ, keys.K_PROJ):
                k = f"{keys.LAYERS}.{i}.{proj}.weight"
                state[k] = _interleaved(state[k], cfg.head_dim)
    assert _diff_after(case, lambda s, c: None) < ATOL
    assert _diff_after(case, interleave) > 100 * ATOL


def test_wrong_kv_grouping_breaks_parity():
    """Query head h reads k/v head h // (H/G); swapping the two k/v heads of llama (H=4, G=2) gives
    each query head the other group's keys and values."""
    def swap_kv_heads(state, cfg):
        D = cfg.head_dim
        for i in range(cfg.layers):
            for proj in (keys.K_PROJ, keys.V_PROJ):
                k = f"{keys.LAYERS}.{i}.{proj}.weight"
                state[k] = torch.cat([state[k][D:2 * D], state[k][:D]])
    assert _diff_after("llama", swap_kv_heads) > 100 * ATOL


# ---- model parallelism ---------------------------------------------------------------------------
def tensor_parallel_logits(model, cfg: DecoderConfig, tokens: torch.Tensor, *, parts: int, split=None):
    """A Megatron forward over ``parts`` ranks holding ``split(key, tensor, parts)`` pieces
    (default: ``checkpoints_tools.layout.split``, the key schema's rules): each rank runs its
    heads / k/v heads / FFN columns; row-parallel outputs are summed over ranks (the all-reduce)
    with their replicated bias added once; vocab-parallel logits are concatenated."""
    from checkpoints_tools import layout

    split = split or layout.split
    state = model.state_dict()
    ranks = []
    for r in range(parts):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in m.named_parameters():
                piece = split(name, state[name], parts)[r]
                if layout.rule_for(name) == "replicated" and name.endswith("bias") and r > 0 \
                        and (".out_proj." in name or ".fc2." in name):
                    piece = torch.zeros_like(piece)  # a row-parallel bias is added once, after the sum
                p.data = piece.clone()  # a rank's attention reads its heads off these widths
        ranks.append(m.decoder)
    d = model.decoder
    with torch.no_grad():
        ctx = build_context(tokens, padding_idx=cfg.padding_idx, cache=None)
        x = d.embed(tokens, None, None)
        ctx = rotary_context(ctx, tokens, cfg=cfg, cache=None, dtype=x.dtype)
        for i, layer in enumerate(d.layers):
            h = layer.self_attn_layer_norm(x)
            x = x + sum(rk.layers[i].self_attn(h, ctx) for rk in ranks)
            h = layer.final_layer_norm(x)
            x = x + sum(rk.layers[i].ffn(h) for rk in ranks)
        x = d.layer_norm(x)
        return torch.cat([rk.output_projection(x) for rk in ranks], dim=-1)


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_mp2_pieces_compute_the_mp1_model(case):
    """The key schema's MP rules (q/k/v/gate/up column: whole heads and k/v groups per rank;
    o/down row) split the model into two ranks that compute its logits; joined again, the pieces
    are the model's tensors, bit for bit."""
    from checkpoints_tools import layout

    hf = hf_model(case)
    ours, cfg = ours_from(hf)
    layout.check_mp(heads=cfg.heads, kv_heads=cfg.num_kv_heads, vocab_size=cfg.vocab_size, ffn_dim=cfg.ffn_dim,
                    embed_dim=cfg.embed_dim, parts=2)
    tokens = random_tokens(2, 14, low=0, high=V, seed=3)
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits
    torch.testing.assert_close(tensor_parallel_logits(ours, cfg, tokens, parts=2), ref, atol=ATOL, rtol=0)
    joined = {k: layout.join(k, layout.split(k, v, 2)) for k, v in ours.state_dict().items()}
    assert all(torch.equal(joined[k], v) for k, v in ours.state_dict().items())

    def wrong(name, t, parts):  # k/v rows dealt out by kv head in the wrong order
        pieces = layout.split(name, t, parts)
        return pieces[::-1] if name.endswith((f"{keys.K_PROJ}.weight", f"{keys.V_PROJ}.weight")) else pieces
    bad = tensor_parallel_logits(ours, cfg, tokens, parts=2, split=wrong)
    assert (bad - ref).abs().max() > 100 * ATOL


def test_mp_that_splits_a_kv_head_is_refused():
    from checkpoints_tools import layout

    cfg = preset("gemma_tiny")  # one k/v head
    with pytest.raises(ValueError, match="k/v heads"):
        layout.check_mp(heads=cfg.heads, kv_heads=cfg.num_kv_heads, vocab_size=cfg.vocab_size,
                        ffn_dim=cfg.ffn_dim, embed_dim=cfg.embed_dim, parts=2)


# ---- configs: what is refused, and the older spelling ---------------------------------------------
def _llama_json(**over):
    return {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "pad_token_id": 3, **over}


def test_older_rope_spelling_is_read():
    """A Llama-3.1 ``config.json`` (``rope_theta`` + ``rope_scaling``) and the older ``type`` key."""
    cfg = hf_families.config_from_hf(_llama_json(rope_theta=500000.0, rope_scaling={
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        "rope_type": "llama3"}))
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    old = hf_families.config_from_hf(_llama_json(rope_scaling={"type": "linear", "factor": 4}))
    assert old.rope_scaling == {"rope_type": "linear", "factor": 4.0} and old.rope_theta == 10000.0


@pytest.mark.parametrize("over,match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "config.json: rope scaling type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "'dynamic'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"attention_bias": True}, "attention_bias=true with mlp_bias=false"),
    ({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new'"),
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
    ({"model_type": "gemma", "attention_bias": True}, "attention_bias=true is not supported for gemma"),
    ({"pad_token_id": None}, "pad_token_id is null"),
])
def test_unsupported_hf_configs_are_refused_by_name(over, match):
    with pytest.raises(ValueError, match=match):
        hf_families.config_from_hf(_llama_json(**over))


def test_configs_no_family_writes_are_refused_by_name():
    with pytest.raises(ValueError, match="norm='layernorm'"):
        hf_families.hf_config(preset("tiny"))
    with pytest.raises(ValueError, match="rope scaling type 'longrope'"):
        DecoderConfig(**{**preset("llama_tiny").__dict__, "rope_scaling": {"rope_type": "longrope"}})
    with pytest.raises(ValueError, match="qkv='fused'"):
        DecoderConfig(**{**preset("llama_tiny").__dict__, "qkv": "fused"})
    with pytest.raises(ValueError, match="not gemma"):
        hf_families.hf_config(preset("llama_tiny"), family="gemma")


def test_an_opt_config_serialises_as_before_and_family_fields_round_trip():
    """OPT configs leave the family fields out (the checkpoint bytes of every existing model stay);
    a family config keeps exactly its non-default ones and reads back equal."""
    from jam_metaseq.models import config_from_json, config_to_json
    from jam_metaseq.models.config import FAMILY_DEFAULTS

    assert not set(preset("tiny").to_dict()) & set(FAMILY_DEFAULTS)
    for name in ("llama_tiny", "qwen2_tiny", "gemma_tiny", "llama3_8b"):
        cfg = preset(name)
        assert config_from_json(config_to_json(cfg)) == cfg, name


def test_parent_counts_are_the_published_ones():
    from jam_metaseq.models import count_parameters

    counts = {n: count_parameters(preset(n)) for n in ("llama2_7b", "llama3_8b", "qwen2_7b", "qwen2_0_5b", "gemma_2b",
                                                       "gemma_7b")}
    assert counts == {"llama2_7b": 6_738_415_616, "llama3_8b": 8_030_261_248, "qwen2_7b": 7_615_616_512,
                      "qwen2_0_5b": 494_032_768, "gemma_2b": 2_506_172_416, "gemma_7b": 8_537_680_896}

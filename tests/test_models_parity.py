"""Parity of the base decoder (metaseq ``model_parallel_transformer_lm``, paper §3.1) with HF
transformers' ``OPTForCausalLM``, the same family, on random weights mapped into metaseq layout.

A negative control (q/k/v stacked in the wrong order) must break the parity, so the test can fail.
"""

from __future__ import annotations


import pytest
import torch

from _model_util import hf_to_metaseq, left_pad, make_hf_opt, random_tokens, tiny_cfg
from jam_metaseq.models import DecoderLM

ATOL = 1e-5


def _pair(cfg, seed=0):
    hf = make_hf_opt(cfg, seed=seed)
    ours = DecoderLM(cfg).eval()
    ours.load_state_dict(hf_to_metaseq(hf.state_dict(), layers=cfg.layers), strict=True)
    return hf, ours


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"activation": "gelu"},
        {"bias": False, "affine_ln": False},
        {"layers": 3, "heads": 8, "embed_dim": 64, "ffn_dim": 96},
    ],
    ids=["relu", "gelu", "no-bias-no-affine", "wider"],
)
def test_logits_match_hf_opt(overrides):
    cfg = tiny_cfg(scale_embedding=False, **overrides)
    hf, ours = _pair(cfg)
    tokens = random_tokens(3, 20, low=0, high=cfg.vocab_size, seed=1)
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits
        got = ours(tokens)
    assert got.shape == ref.shape == (3, 20, cfg.vocab_size)
    assert ref.abs().max() > 1e-2  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("wrong_order", [("q", "k", "v"), ("k", "q", "v"), ("v", "k", "q")])
def test_wrong_qkv_order_breaks_parity(wrong_order):
    """Negative control: the same weights stacked in another order give different logits."""
    cfg = tiny_cfg(scale_embedding=False)
    hf = make_hf_opt(cfg, seed=0)
    ours = DecoderLM(cfg).eval()
    ours.load_state_dict(hf_to_metaseq(hf.state_dict(), layers=cfg.layers, qkv_order=wrong_order), strict=True)
    tokens = random_tokens(2, 16, low=0, high=cfg.vocab_size, seed=1)
    with torch.no_grad():
        diff = (ours(tokens) - hf(input_ids=tokens).logits).abs().max()
    assert diff > 100 * ATOL


def test_left_padding_matches_hf_attention_mask():
    """Left-padded rows: our pad-token masking and position counting equal HF's attention_mask."""
    cfg = tiny_cfg(scale_embedding=False)
    hf, ours = _pair(cfg, seed=3)
    lengths = [12, 5, 9, 1]
    rows = [random_tokens(1, n, low=0, high=cfg.vocab_size, seed=10 + n)[0] for n in lengths]
    tokens = left_pad(rows, padding_idx=cfg.padding_idx)
    attention_mask = tokens.ne(cfg.padding_idx).long()
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=attention_mask).logits
        got = ours(tokens)
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=ATOL, rtol=0)
    # Each padded row equals the same row run alone without padding.
    with torch.no_grad():
        for b, row in enumerate(rows):
            alone = ours(row[None])[0]
            torch.testing.assert_close(got[b, -row.numel():], alone, atol=ATOL, rtol=0)


def test_padding_is_not_ignored():
    """Control for the padding test: dropping the pad mask (pad id treated as a word) changes results."""
    cfg = tiny_cfg(scale_embedding=False)
    _, ours = _pair(cfg, seed=3)
    row = random_tokens(1, 6, low=0, high=cfg.vocab_size, seed=4)[0]
    padded = left_pad([row, torch.cat([row, row])], padding_idx=cfg.padding_idx)
    unk = padded.clone()
    unk[unk == cfg.padding_idx] = 3  # same length, but the first positions are real (unk) tokens
    with torch.no_grad():
        a, b = ours(padded)[0, -6:], ours(unk)[0, -6:]
    assert (a - b).abs().max() > 100 * ATOL


def test_matches_hf_under_autograd():
    """Gradients flow the same way: d(loss)/d(fc1 of layer 0) equals HF's (mapped) gradient."""
    cfg = tiny_cfg(scale_embedding=False)
    hf, ours = _pair(cfg, seed=5)
    tokens = random_tokens(2, 10, low=0, high=cfg.vocab_size, seed=6)
    ours(tokens).logsumexp(-1).mean().backward()
    hf(input_ids=tokens).logits.logsumexp(-1).mean().backward()
    torch.testing.assert_close(
        ours.decoder.layers[0].fc1.weight.grad, hf.model.decoder.layers[0].fc1.weight.grad, atol=1e-5, rtol=1e-4
    )
    # Tied embedding: input and output uses accumulate into one gradient in both.
    torch.testing.assert_close(
        ours.decoder.embed_tokens.weight.grad, hf.model.decoder.embed_tokens.weight.grad, atol=1e-5, rtol=1e-4
    )


def test_production_converter_agrees_with_test_map(tmp_path):
    """Cross-check: the checkpoint helper's HF reader (a saved HF OPT, read with metaseq names) gives
    the same tensors as this file's key map, its config is ours, and its inverse gives HF's names."""
    from checkpoints_tools import readers
    from jam_metaseq.models.hf_families import FAMILIES

    cfg = tiny_cfg(scale_embedding=False)
    hf = make_hf_opt(cfg, seed=7)
    hf.save_pretrained(tmp_path)
    reader = readers.HFReader(tmp_path)
    expected = hf_to_metaseq(hf.state_dict(), layers=cfg.layers)
    got = dict(reader.items())
    assert set(got) == set(expected)
    for k in expected:
        assert torch.equal(got[k].float(), expected[k].float()), k
    read_cfg = reader.config()
    for field in ("vocab_size", "embed_dim", "ffn_dim", "layers", "heads", "max_positions", "bias",
                  "affine_ln", "activation", "scale_embedding"):
        assert getattr(read_cfg, field) == getattr(cfg, field), field
    back = {}
    for k, v in expected.items():
        back.update(dict(FAMILIES["opt"].to_hf_items(k, v, cfg=cfg)))
    hf_sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert set(back) == set(hf_sd)
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)

"""Chameleon (issue 24) against its reference implementation: HF ``transformers``'
``ChameleonForConditionalGeneration`` with tiny random configs built here (one with grouped k/v heads,
one with the 30B model's ``swin_norm`` and biases), mapped through ``jam_metaseq.models.hf_families`` (``chameleon.py``)
and ``jam_metaseq.image_tokenizer.hf_vqvae``.

Our logits equal HF's (fp32 round-off) unpadded, left-padded and decoded through the KV cache; HF ->
ours -> HF state dicts (decoder and VQ model) and configs are bit-identical, and a config we write
loads in ``transformers`` and computes the same; a model-parallel forward over MP=2 pieces cut by the
key schema's rules equals MP=1 (the per-head q/k norms split by heads), and joined again the pieces
are the tensors. Our image tokenizer encodes like HF's ``ChameleonVQVAE`` (latents and codes).
Negative controls: the q/k norms left out, applied over all heads at once, split over MP in the
wrong order, or ``swin_norm`` ignored, each break the parity.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from _hf_util import ours_from
from _model_util import left_pad, random_tokens
from jam_metaseq.models import build_model, count_parameters, hf_families, keys, preset
from jam_metaseq.models.hf_families import chameleon as hf_chameleon
from jam_metaseq.models.config import DecoderConfig, config_from_json, config_to_json
from jam_metaseq.models.decoder import build_context, rotary_context

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)
ATOL = 1e-5
V = 128
IMAGE_IDS = {"IMGIMGAZ": 120, "IMGIMGBZ": 121, "IMGIMGDZ": 122, "IMGIMGCZ": 123}
"""A tiny ``vocabulary_map``: four image codes (0, 1, 3, 2: BPE id order is not code order)."""
VOCABULARY_MAP = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<image>": 5, "<racm3:break>": 6, "<eoss>": 7,
                  **IMAGE_IDS, **{f"<reserved{8800 + k:05d}>": 100 + k for k in range(17)}}
"""... and the specials, image frame and 17 reserved ids the vocabulary manifest reads from it."""
VQ = dict(embed_dim=8, num_embeddings=64, latent_channels=32, resolution=16, base_channels=32,
          channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[8])
"""A tiny ChameleonVQVAE: 16 px -> 8 x 8 codes of 64, attention at side 8, GroupNorm(32)."""
_SHAPE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, pad_token_id=1, vocabulary_map=VOCABULARY_MAP, vq_config=VQ,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
CASES = {  # written from HF's own parameter names (the independent side of the test)
    "chameleon": dict(_SHAPE, num_key_value_heads=2),
    "chameleon-swin-biases": dict(_SHAPE, num_key_value_heads=4, swin_norm=True, attention_bias=True, mlp_bias=True,
                                  rms_norm_eps=1e-6),
}


def hf_model(case: str, *, seed: int = 0, **over):
    """``ChameleonForConditionalGeneration`` (SDPA) of ``case`` (``over``: config changes), every
    weight random (norm scales near 1, and the per-head q/k norm weights different per head)."""
    model = transformers.ChameleonForConditionalGeneration._from_config(
        transformers.ChameleonConfig(**{**CASES[case], **over}), attn_implementation="sdpa")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(noise + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model.eval()



@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
    hf = hf_model(request.param)
    ours, cfg = ours_from(hf)
    return request.param, hf, ours, cfg


def _hf_logits(hf, tokens: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=tokens, **kw).logits


_TEXT = [i for i in range(V) if i not in IMAGE_IDS.values()]
"""The columns HF does not mask (its forward sets image-code logits to the dtype's minimum)."""


def test_config_is_the_tiny_preset_and_round_trips():
    cfg = hf_chameleon.config_from_hf(hf_model("chameleon").config.to_dict())
    assert cfg == preset("chameleon_tiny")
    assert config_from_json(config_to_json(cfg)) == cfg
    swin = hf_chameleon.config_from_hf(hf_model("chameleon-swin-biases").config.to_dict())
    assert swin.swin_norm and swin.bias and swin.num_kv_heads == 4 and swin.ln_eps == 1e-6


def test_logits_match_hf(pair):
    case, hf, ours, cfg = pair
    tokens = random_tokens(3, 20, low=0, high=V, seed=1)
    ref, got = _hf_logits(hf, tokens), ours(tokens).detach()
    assert ref[..., _TEXT].abs().max() > 0.1
    torch.testing.assert_close(got[..., _TEXT], ref[..., _TEXT], atol=ATOL, rtol=0)
    assert (ref[..., list(IMAGE_IDS.values())] == torch.finfo(ref.dtype).min).all()  # HF's image-token mask


def test_left_padded_and_cached_decoding_match_hf(pair):
    """Left-padded prompts and 4 generated tokens: our full forward and our KV-cache decoding (prefill,
    then one token per step) equal HF's logits (attention mask, per-row positions) on every real token."""
    case, hf, ours, cfg = pair
    pad = cfg.padding_idx
    rows = [random_tokens(1, n, low=2, high=V, seed=30 + n)[0] for n in (9, 4, 1)]
    tokens = torch.cat([left_pad(rows, padding_idx=pad), random_tokens(3, 4, low=2, high=V, seed=5)], dim=1)
    real = tokens.ne(pad)
    mask = real.long()
    ref = _hf_logits(hf, tokens, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).masked_fill(mask == 0, 1))
    ref = ref[..., _TEXT][real]
    with torch.no_grad():
        full = ours(tokens)
        cache = ours.setup_caches(3, tokens.shape[1])
        stepped = torch.cat([ours(tokens[:, a:b], cache=cache) for a, b in ((0, 9), (9, 10), (10, 11), (11, 12),
                                                                              (12, 13))], dim=1)
    torch.testing.assert_close(full[..., _TEXT][real], ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(stepped[..., _TEXT][real], ref, atol=ATOL, rtol=0)


def test_hf_to_ours_to_hf_is_bit_identical(pair):
    """Decoder through our model and the VQ model through our image tokenizer (its decoder from a
    second state dict, as for Meta's vqgan.ckpt), back to HF names: every tensor HF has, bit for bit."""
    from jam_metaseq.image_tokenizer import VQGAN, hf_vqvae

    case, hf, ours, cfg = pair
    hf_state = hf.state_dict()
    back = hf_families.to_hf_state(ours.state_dict(), cfg)
    decoder = {k: v for k, v in VQGAN(hf_vqvae.config_from_hf(VQ)).state_dict().items() if k.startswith("decoder.")}
    vq = hf_vqvae.vqgan_from_hf(hf.config.vq_config.to_dict(), hf_state, decoder_state=decoder)
    back.update(hf_vqvae.to_hf_state(vq.state_dict()))
    assert set(back) == set(hf_state)
    assert all(torch.equal(back[k], hf_state[k]) for k in hf_state)
    assert hf_vqvae.hf_vq_config(vq.config) == {k: v for k, v in hf.config.vq_config.to_dict().items()
                                                if k in hf_vqvae.hf_vq_config(vq.config)}


def test_written_config_loads_in_transformers_and_computes_the_same(pair):
    case, hf, ours, cfg = pair
    written = hf_chameleon.hf_config(cfg, vocabulary_map=VOCABULARY_MAP, vq_config=VQ)
    config = transformers.ChameleonConfig.from_dict(written)
    assert hf_chameleon.config_from_hf(config.to_dict()) == cfg
    reloaded = transformers.ChameleonForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    missing, unexpected = reloaded.load_state_dict(hf_families.to_hf_state(ours.state_dict(), cfg), strict=False)
    assert not unexpected and all(k.startswith(hf_chameleon.VQ_PREFIX) for k in missing)
    tokens = random_tokens(2, 12, low=0, high=V, seed=2)
    torch.testing.assert_close(_hf_logits(reloaded, tokens)[..., _TEXT], ours(tokens).detach()[..., _TEXT],
                               atol=ATOL, rtol=0)


def test_image_tokenizer_encodes_like_hf_chameleon_vqvae():
    """Our VQGAN with HF's ``model.vqmodel.*`` tensors: the encoder's latents, the quantized latents
    and the codes equal ``ChameleonVQVAE.encode``'s (HF's codes are flattened row-major)."""
    from jam_metaseq.image_tokenizer import VQGAN, hf_vqvae

    hf = hf_model("chameleon").model.vqmodel
    cfg = hf_vqvae.config_from_hf(VQ)
    ours = VQGAN(cfg).eval()
    ours.load_state_dict({**ours.state_dict(), **hf_vqvae.from_hf_state(hf.state_dict(), prefix="")}, strict=True)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ref = hf.encode(images, return_dict=True)
        z = ours.encode_latents(images)
        codes = ours.encode(images)
    torch.testing.assert_close(ours.encoder(images), ref.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.quantize.lookup(codes), ref.quantized_last_hidden_state, atol=ATOL, rtol=0)
    assert codes.shape == (3, *cfg.grid) and torch.equal(codes.reshape(-1), ref.image_tokens)
    assert len(set(codes.reshape(-1).tolist())) > 4  # the test is not one code everywhere
    assert z.shape == (3, 8, 8, 8)


def test_an_hf_vq_model_without_decoder_is_refused_by_name():
    from jam_metaseq.image_tokenizer import hf_vqvae

    hf_state = hf_model("chameleon").state_dict()
    with pytest.raises(hf_vqvae.MissingDecoderError, match="no decoder.*vqgan.ckpt"):
        hf_vqvae.vqgan_from_hf(VQ, hf_state)
    with pytest.raises(ValueError, match="attn_type 'none'"):
        hf_vqvae.config_from_hf({**VQ, "attn_type": "none"})


# ---- model parallelism ---------------------------------------------------------------------------
def tensor_parallel_logits(model, cfg: DecoderConfig, tokens: torch.Tensor, *, parts: int, split=None):
    """A Megatron forward over ``parts`` ranks, each holding ``split(key, tensor, parts)[rank]``
    (default ``checkpoints_tools.layout.split``: the key schema's rules): a rank computes its query
    and k/v heads (its rows of the per-head q/k norms with them) and its FFN columns; row-parallel
    outputs are summed (the all-reduce); vocab-parallel logits are concatenated. Pre-norm or swin."""
    from checkpoints_tools import layout

    split = split or layout.split
    state = model.state_dict()
    ranks = []
    for r in range(parts):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in m.named_parameters():
                piece = split(name, state[name], parts)[r]
                if name.endswith("bias") and layout.rule_for(name) == "replicated" and r > 0 \
                        and (".out_proj." in name or ".fc2." in name):
                    piece = torch.zeros_like(piece)  # a row-parallel bias is added once, after the sum
                p.data = piece.clone()
        ranks.append(m.decoder)
    d = model.decoder
    with torch.no_grad():
        ctx = build_context(tokens, padding_idx=cfg.padding_idx, cache=None)
        x = d.embed(tokens, None, None)
        ctx = rotary_context(ctx, tokens, cfg=cfg, cache=None, dtype=x.dtype)
        for i, layer in enumerate(d.layers):
            if cfg.swin_norm:
                x = x + layer.self_attn_layer_norm(sum(rk.layers[i].self_attn(x, ctx) for rk in ranks))
                x = x + layer.final_layer_norm(sum(rk.layers[i].ffn(x) for rk in ranks))
            else:
                h = layer.self_attn_layer_norm(x)
                x = x + sum(rk.layers[i].self_attn(h, ctx) for rk in ranks)
                h = layer.final_layer_norm(x)
                x = x + sum(rk.layers[i].ffn(h) for rk in ranks)
        x = d.layer_norm(x)
        return torch.cat([rk.output_projection(x) for rk in ranks], dim=-1)


def test_mp2_pieces_compute_the_mp1_model(pair):
    """q/k norms split by heads (rule ``column``) with the q/k projections: two ranks compute HF's
    logits; joined, the pieces are the tensors bit for bit. Dealt out in the wrong order (rank 0 gets
    rank 1's norm rows), the parity breaks."""
    from checkpoints_tools import layout

    case, hf, ours, cfg = pair
    assert {layout.rule_for(k) for k in keys.state_keys(cfg) if keys.is_qk_norm(k)} == {"column"}
    tokens = random_tokens(2, 14, low=0, high=V, seed=3)
    ref = _hf_logits(hf, tokens)[..., _TEXT]
    torch.testing.assert_close(tensor_parallel_logits(ours, cfg, tokens, parts=2)[..., _TEXT], ref, atol=ATOL, rtol=0)
    joined = {k: layout.join(k, layout.split(k, v, 2)) for k, v in ours.state_dict().items()}
    assert all(torch.equal(joined[k], v) for k, v in ours.state_dict().items())

    def wrong(name, t, parts):
        pieces = layout.split(name, t, parts)
        return pieces[::-1] if keys.is_qk_norm(name) else pieces
    bad = tensor_parallel_logits(ours, cfg, tokens, parts=2, split=wrong)[..., _TEXT]
    assert (bad - ref).abs().max() > 100 * ATOL


# ---- negative controls ---------------------------------------------------------------------------
def _diff(hf, model) -> float:
    tokens = random_tokens(2, 16, low=0, high=V, seed=1)
    with torch.no_grad():
        return float((model(tokens)[..., _TEXT] - _hf_logits(hf, tokens)[..., _TEXT]).abs().max())


def test_qk_norm_left_out_or_on_the_wrong_axis_breaks_parity():
    hf = hf_model("chameleon")
    ours, cfg = ours_from(hf)
    assert _diff(hf, ours) < ATOL
    plain = build_model(dataclasses.replace(cfg, qk_norm="none")).eval()
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if not keys.is_qk_norm(k)}, strict=True)
    assert _diff(hf, plain) > 100 * ATOL

    def all_heads(norm, x):  # statistics over every head's features at once (B, h, T, D)
        y = F.layer_norm(x.transpose(1, 2), x.transpose(1, 2).shape[-2:], eps=norm.eps).transpose(1, 2)
        return y * norm.weight[:, None, :] + norm.bias[:, None, :]
    wrong = copy.deepcopy(ours)
    for layer in wrong.decoder.layers:
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            norm.forward = lambda x, n=norm: all_heads(n, x)
    assert _diff(hf, wrong) > 100 * ATOL


def test_swin_norm_ignored_breaks_parity():
    hf = hf_model("chameleon-swin-biases")
    ours, cfg = ours_from(hf)
    assert _diff(hf, ours) < ATOL
    pre = build_model(dataclasses.replace(cfg, swin_norm=False)).eval()
    pre.load_state_dict(ours.state_dict(), strict=True)
    assert _diff(hf, pre) > 100 * ATOL


# ---- jam-ckpt --------------------------------------------------------------------------------------
def test_jam_ckpt_reads_an_hf_chameleon_directory_and_writes_it_back(tmp_path):
    """A Chameleon HF directory (sharded, with its index; the VQ model in the same files) is read by
    ``jam-ckpt`` like the other families: ``inspect`` counts the decoder only, the model read computes
    HF's logits, ``convert --to metaseq`` at MP 2 and back ``--to hf`` gives the decoder's tensors bit
    for bit in a directory ``transformers`` loads as ``ChameleonForConditionalGeneration``."""
    from checkpoints_tools import load_model
    from checkpoints_tools.cli import main as jam_ckpt
    from checkpoints_tools.load import inspect_checkpoint
    from checkpoints_tools.readers import open_checkpoint

    hf = hf_model("chameleon")
    hf.save_pretrained(tmp_path / "cham", max_shard_size="100KB")
    assert (tmp_path / "cham" / "model.safetensors.index.json").is_file()
    model, cfg, _ = load_model(tmp_path / "cham")
    assert cfg == preset("chameleon_tiny")
    tokens = random_tokens(2, 12, low=0, high=V, seed=4)
    torch.testing.assert_close(model(tokens).detach()[..., _TEXT], _hf_logits(hf, tokens)[..., _TEXT], atol=ATOL, rtol=0)
    vocab = open_checkpoint(tmp_path / "cham").vocab()  # stated by the config's vocabulary_map
    assert vocab.explicit_ids.image_map == (120, 121, 123, 122) and (vocab.boi, vocab.eoi) == (6, 7)
    assert vocab.image_grid == (8, 8) and list(vocab.sentinel_range) == list(range(100, 116))
    info = inspect_checkpoint(tmp_path / "cham")
    assert info["format"] == "hf_chameleon"
    assert info["parameters"] == sum(p.numel() for n, p in hf.named_parameters() if not n.startswith("model.vqmodel."))
    flags = ["--quiet", "--no-hash-sources"]
    assert jam_ckpt(["convert", str(tmp_path / "cham"), "--to", "metaseq", "--mp", "2", "-o", str(tmp_path / "ms"),
                     *flags]) == 0
    assert open_checkpoint(tmp_path / "ms").mp == 2
    assert jam_ckpt(["convert", str(tmp_path / "ms"), "--to", "hf", "-o", str(tmp_path / "back"), *flags]) == 0
    again = transformers.ChameleonForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    a, b = hf.state_dict(), again.state_dict()
    decoder = [k for k in a if not k.startswith(hf_chameleon.VQ_PREFIX)]
    assert decoder and all(torch.equal(a[k], b[k]) for k in decoder)
    assert hf_chameleon.config_from_hf(again.config.to_dict()) == cfg
    # the vocabulary stated again (from the manifest): transformers masks the same image ids, so the
    # whole logits, masked columns included, are the original's
    assert {k: v for k, v in again.config.vocabulary_map.items() if k.startswith("IMGIMG")} == IMAGE_IDS
    torch.testing.assert_close(_hf_logits(again, tokens), _hf_logits(hf, tokens), atol=ATOL, rtol=0)
    assert open_checkpoint(tmp_path / "back").vocab() == vocab



def test_jam_generate_writes_chameleon_format_answers_and_decodes_them_with_the_parents_vq_model(tmp_path, capsys):
    """Item 5: an HF Chameleon directory -> ``jam-ckpt convert`` (the manifest read from its
    ``vocabulary_map``) -> ``jam-generate --images force`` with CFG: the answer opens an image with
    ``<racm3:break>``, draws exactly tokens-per-image ids of the image map, closes it with the
    forced ``<eoss>``; the parent's VQ model (HF's encoder, a decoder beside it as Meta ships
    ``vqgan.ckpt``) decodes it into ``answers.html``. Eager and static decoding agree."""
    import json

    from checkpoints_tools.cli import main as jam_ckpt
    from jam_metaseq.generation.answer import Answer
    from jam_metaseq.generation.cli import main as jam_generate
    from jam_metaseq.image_tokenizer import VQGAN, hf_vqvae, save_taming_checkpoint

    vq_cfg = {**VQ, "num_embeddings": len(IMAGE_IDS)}  # the codebook the vocabulary's image codes index
    hf = hf_model("chameleon", max_position_embeddings=160, vq_config=vq_cfg)
    hf.save_pretrained(tmp_path / "cham")
    assert jam_ckpt(["convert", str(tmp_path / "cham"), "--to", "metaseq", "-o", str(tmp_path / "ours"), "--quiet",
                     "--no-hash-sources"]) == 0
    decoder = {k: v for k, v in VQGAN(hf_vqvae.config_from_hf(vq_cfg)).state_dict().items() if k.startswith("decoder.")}
    vq = hf_vqvae.vqgan_from_hf(hf.config.vq_config.to_dict(), hf.state_dict(), decoder_state=decoder)
    (tmp_path / "vq").mkdir()
    save_taming_checkpoint(vq, ckpt_path=tmp_path / "vq" / "vqgan.ckpt", yaml_path=tmp_path / "vq" / "vqgan.yaml")
    capsys.readouterr()
    runs = {}
    for decode in ("eager", "static"):
        out = tmp_path / f"answers_{decode}"
        rc = jam_generate(["--checkpoint", str(tmp_path / "ours"), "--tokenizer", "bytes", "--prompt", "A RED CUBE",
                           "--images", "force", "--max-images", "1", "--max-new-tokens", "70", "--guidance-scale", "3",
                           "--image-tokenizer", str(tmp_path / "vq"), "--out", str(out), "--no-progress",
                           "--decode", decode, "--dtype", "float64"])
        assert rc == 0, capsys.readouterr().err
        runs[decode] = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert runs["eager"] == runs["static"]
    answer = Answer.from_dict(runs["eager"][0])
    n = 64  # the VQ model's 8 x 8 grid
    assert answer.ids[0] == VOCABULARY_MAP["<racm3:break>"] and answer.ids[n + 1] == VOCABULARY_MAP["<eoss>"]
    assert set(answer.ids[1:n + 1]) <= set(IMAGE_IDS.values())
    assert answer.images[0].complete and len(sum(answer.images[0].codes, [])) == n
    html = (tmp_path / "answers_eager" / "answers.html").read_text()
    pngs = sorted((tmp_path / "answers_eager" / "images").glob("*.png"))
    assert pngs and pngs[0].name in html



def _llama_partner(d, *, hidden: int = 48, layers: int = 3):
    """A tiny random HF Llama beside the Chameleon case (its vocabulary, pad, eps and rotary; another
    width and depth, no q/k norms), saved to ``d``."""
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=1, rms_norm_eps=1e-5, rope_theta=10000.0)
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(d)
    return d


def test_jam_ckpt_crosses_a_llama_with_a_chameleon_and_uniform_width_refuse_naming_jam_cross(tmp_path, capsys):
    """Item 4: ``jam-ckpt cross --llm LLAMA --img CHAMELEON`` (wider, deeper Llama; the Chameleon
    branch keeps its q/k norms) with ``preserve``: each branch of the output computes its parent
    (the hidden state entering its final norm). ``merge`` and ``widen`` of the same parents stop with
    one line naming the block field and JAM-Cross."""
    from _model_util import pre_norm_hidden
    from checkpoints_tools import load_model
    from checkpoints_tools.cli import main as jam_ckpt

    llama = _llama_partner(tmp_path / "llama")
    hf_model("chameleon").save_pretrained(tmp_path / "cham")
    flags = ["--quiet", "--no-hash-sources"]
    assert jam_ckpt(["cross", "--llm", str(llama), "--img", str(tmp_path / "cham"), "--cross-every", "1", "--init",
                     "preserve", "-o", str(tmp_path / "cross"), *flags]) == 0
    fused, cfg, _ = load_model(tmp_path / "cross")
    assert (cfg.llm.qk_norm, cfg.img.qk_norm, cfg.llm.embed_dim, cfg.img.embed_dim) == ("none", "layernorm_per_head",
                                                                                          48, 32)
    assert (cfg.image_vocab_start, cfg.image_vocab_end) == (120, 124)  # the Chameleon manifest's image ids
    llm, _, _ = load_model(llama)
    img, _, _ = load_model(tmp_path / "cham")
    tokens = random_tokens(2, 10, low=8, high=120, seed=3)
    with torch.no_grad():
        x_llm, x_img = fused.branch_features(tokens)
    torch.testing.assert_close(x_llm, pre_norm_hidden(llm, tokens), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_img, pre_norm_hidden(img, tokens), atol=1e-5, rtol=0)
    same_size = _llama_partner(tmp_path / "llama32", hidden=32, layers=2)
    capsys.readouterr()
    for verb in (["merge", str(same_size), str(tmp_path / "cham")],
                 ["widen", "--llm", str(same_size), "--img", str(tmp_path / "cham")]):
        assert jam_ckpt([*verb, "-o", str(tmp_path / verb[0]), *flags]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "qk_norm" in err[0] and "JAM-Cross" in err[0], err
        assert not (tmp_path / verb[0]).exists()


# ---- configs and counts --------------------------------------------------------------------------
def test_configs_no_chameleon_class_computes_are_refused_by_name():
    with pytest.raises(ValueError, match="qk_norm='layernorm_per_head'; this model has qk_norm='none'"):
        hf_chameleon.hf_config(preset("llama_tiny"), vocabulary_map=VOCABULARY_MAP)
    with pytest.raises(ValueError, match="qk_norm='none'; this model has qk_norm='layernorm_per_head'"):
        hf_families.FAMILIES["llama"].check(preset("chameleon_tiny"))  # a Llama file would lose the q/k norms
    with pytest.raises(ValueError, match="is a chameleon model, not llama"):
        hf_families.hf_config(preset("chameleon_tiny"), family="llama")
    assert hf_families.family_for(preset("chameleon_tiny")) is hf_chameleon.FAMILY
    assert hf_families.family_by_names(list(hf_model("chameleon").state_dict())) is hf_chameleon.FAMILY
    with pytest.raises(ValueError, match="model_type 'llama' is not 'chameleon'"):
        hf_chameleon.config_from_hf({**CASES["chameleon"], "model_type": "llama"})
    with pytest.raises(ValueError, match="hidden_act 'gelu_new'"):
        hf_chameleon.config_from_hf({**CASES["chameleon"], "model_type": "chameleon", "hidden_act": "gelu_new"})


def test_parent_counts():
    """Chameleon-7B is Llama-2-7B with 65,536 embedding and head rows and four (32, 128) q/k norm
    tensors per layer; Chameleon-30B is the paper's 34B."""
    extra_rows = 2 * (65536 - 32000) * 4096
    qk = 32 * 4 * 32 * 128
    assert count_parameters(preset("chameleon_7b")) == count_parameters(preset("llama2_7b")) + extra_rows + qk
    assert count_parameters(preset("chameleon_7b")) == 7_013_666_816
    assert count_parameters(preset("chameleon_30b")) == 34_294_308_864

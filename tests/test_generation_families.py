"""Decoding the Llama family (issue 23, item 6): rotary positions per row and a grouped KV cache
through ``jam-generate``'s engine. Cached decoding equals the uncached one, and the eager, static
and graph (its CPU fallback: static) modes give the same tokens for the same seeds, on Gemma's
decoder (one k/v head, head width 16 > E / H) and a JAM-Cross of two Llama parents. The static
mode's logits equal the eager ones in ``test_generation_static`` (``FAMILY_ARCHS``)."""

from __future__ import annotations

import warnings

import pytest
import torch

from _generation_util import FAMILY_ARCHS, PROMPTS, VOCAB, float64, one_thread, tiny_config  # noqa: F401
from jam_metaseq.generation.engine import Engine, GenerationConfig
from jam_metaseq.generation.sampling import SamplingConfig
from jam_metaseq.models import build_model


@pytest.fixture(scope="module", params=FAMILY_ARCHS)
def model64(request):
    torch.manual_seed(0)
    return float64(build_model(tiny_config(request.param)).eval())


def _engine(model, decode: str, **kw) -> Engine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # graph off CUDA falls back to static (tested in test_generation_static)
        return Engine(model, vocab=VOCAB, decode=decode, **kw)


def test_the_cache_stores_kv_heads(model64):
    cache = model64.setup_caches(2, 8)
    cfg = getattr(model64.cfg, "parent", model64.cfg)
    assert all(k.shape[2] == cfg.num_kv_heads < cfg.heads and k.shape[4] == cfg.head_dim for k in cache.groups_k)


def test_cached_greedy_equals_uncached(model64):
    greedy = SamplingConfig(temperature=0.0)
    cfg = GenerationConfig(max_new_tokens=24, min_images=1, text=greedy, image=greedy, guidance_scale=3.5)
    cached = Engine(model64, vocab=VOCAB).generate(PROMPTS, config=cfg)
    uncached = Engine(model64, vocab=VOCAB, use_cache=False).generate(PROMPTS, config=cfg)
    assert [a.ids for a in cached] == [a.ids for a in uncached]
    assert all(a.images for a in cached)


def test_eager_static_and_graph_modes_give_the_same_tokens(model64):
    cfg = GenerationConfig(max_new_tokens=30, min_images=1)
    seeds = [7, 8, 9]
    eager = [a.ids for a in _engine(model64, "eager").generate(PROMPTS, config=cfg, seeds=seeds)]
    for decode, key_block in (("static", 8), ("static", 0), ("graph", 16)):
        got = [a.ids for a in _engine(model64, decode, key_block=key_block).generate(PROMPTS, config=cfg, seeds=seeds)]
        assert got == eager, (decode, key_block)
    other = [a.ids for a in _engine(model64, "static").generate(PROMPTS, config=cfg, seeds=[1, 2, 3])]
    assert other != eager  # control: the seeds matter


def test_jam_generate_on_an_imported_hf_llama(tmp_path, capsys):
    """``jam-generate`` on an HF ``LlamaForCausalLM`` imported by ``jam-ckpt convert`` with its
    vocabulary manifest (explicit ids: its own specials, reserved ids as <break> and sentinels, an
    image range), through ``load_model``: eager, static and graph (CPU: static) give the same tokens."""
    import json

    pytest.importorskip("transformers")
    from _hf_util import hf_model
    from checkpoints_tools.cli import main as jam_ckpt
    from jam_metaseq.generation.answer import Answer
    from jam_metaseq.generation.cli import main as jam_generate
    from jam_metaseq.vocab import TokenIds, VocabManifest

    ids = TokenIds(size=320, bos=0, pad=1, eos=2, unk=3, break_id=4, sentinels=(5, 7), eoss=7, text=(8, 264),
                   image=(264, 296))
    VocabManifest.imported(ids, image_grid=(2, 2), image_tokens_per_image=4).save(tmp_path / "vocab.json")
    hf_model("llama", seed=3, vocab_size=320, pad_token_id=None, max_position_embeddings=128).save_pretrained(
        tmp_path / "hf")
    assert jam_ckpt(["convert", str(tmp_path / "hf"), "--to", "metaseq", "--vocab", str(tmp_path / "vocab.json"),
                     "-o", str(tmp_path / "ours"), "--quiet", "--no-hash-sources"]) == 0
    capsys.readouterr()  # jam-ckpt's output path
    by_mode = {}
    for decode in ("eager", "static", "graph"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = jam_generate(["--checkpoint", str(tmp_path / "ours"), "--tokenizer", "bytes", "--prompt", "a red cube",
                               "--max-new-tokens", "16", "--min-images", "1", "--no-progress", "--decode", decode,
                               "--dtype", "float64"])
        out = capsys.readouterr()
        assert rc == 0, out.err
        by_mode[decode] = out.out
    assert by_mode["static"] == by_mode["graph"] == by_mode["eager"]
    answer = Answer.from_dict(json.loads(by_mode["eager"].splitlines()[0]))
    assert answer.prompt_ids[1:] == [8 + b for b in b"a red cube"]  # the manifest's text ids
    assert answer.images and answer.images[0].complete

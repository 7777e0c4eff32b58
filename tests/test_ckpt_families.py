"""jam-ckpt on Hugging Face Llama / Qwen2 / Gemma checkpoints (issue 23, items 2 and 4): the
reference is ``transformers`` itself (tiny random ``*ForCausalLM`` saved with ``save_pretrained``,
one of them sharded with an index).

- Read: every verb takes an HF directory, tensor by tensor; the model read computes HF's logits.
- Write: ``convert --to hf`` writes the family's own layout, sharded at ``--max-shard-size`` with
  the index; ``AutoModelForCausalLM.from_pretrained`` loads it (no custom code) and HF -> ours ->
  HF is bit-identical. A JAM-Uniform or JAM-Width model of two HF parents is a plain, wider model
  of their family: loaded in ``transformers`` it computes what our fused model computes. JAM-Cross
  is refused for ``--to hf`` and loads in ours, ``preserve`` reproducing each parent (HF's hidden
  state entering its final norm).
- Refusals name the field and the fusion that would work; an HF Llama without a pad id needs its
  vocabulary manifest, whose explicit ids may add the rows a parent lacks (``TokenIds.extends``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _hf_util import V, hf_model
from _model_util import pre_norm_hidden, random_tokens
from checkpoints_tools import load_model
from checkpoints_tools.cli import main as jam_ckpt
from checkpoints_tools.io import OutputSpec
from checkpoints_tools.load import inspect_checkpoint
from checkpoints_tools.ops import CommonOptions, cross, merge, reshard, widen
from checkpoints_tools.readers import open_checkpoint
from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.models import hf_families
from jam_metaseq.vocab import TokenIds, VocabManifest

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)
ATOL = 1e-5
FAMILIES = ["llama", "qwen2", "gemma"]
LO, HI = 96, 120  # the tiny parents' "image code" rows


def _opts(out: Path, vocab: Path | None = None, **spec) -> CommonOptions:
    return CommonOptions(spec=OutputSpec(out_dir=out, **spec), progress=False, hash_sources="none",
                         vocab=str(vocab) if vocab else None)


def _save(model, d: Path, **kw) -> Path:
    model.save_pretrained(d, **kw)
    return d


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> dict[str, tuple[Path, Path, object, object]]:
    """Per family, two tiny random HF parents: (dir A, dir B, model A, model B); Llama's A is
    saved as a sharded set with its index."""
    root = tmp_path_factory.mktemp("hf_parents")
    out = {}
    for fam in FAMILIES:
        a, b = hf_model(fam, seed=1), hf_model(fam, seed=2)
        shard = {"max_shard_size": "50KB"} if fam == "llama" else {}
        out[fam] = (_save(a, root / f"{fam}_a", **shard), _save(b, root / f"{fam}_b"), a, b)
    assert (out["llama"][0] / "model.safetensors.index.json").is_file()
    return out


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=tokens).logits if hasattr(model, "config") and hasattr(model, "generate") \
            else model(tokens)
    return out


TOKENS = random_tokens(2, 12, low=4, high=V, seed=7)


# ---- reading --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", FAMILIES)
def test_hf_directories_read_as_our_model(fam, parents):
    d, _, hf, _ = parents[fam]
    model, cfg, _ = load_model(d)
    assert (cfg.norm, cfg.positions, cfg.mlp) == ({"gemma": "rmsnorm_plus_one"}.get(fam, "rmsnorm"), "rotary", "gated")
    torch.testing.assert_close(_logits(model, TOKENS), _logits(hf, TOKENS), atol=ATOL, rtol=0)
    info = inspect_checkpoint(d)
    assert info["format"] == f"hf_{fam}" and info["arch"] == "decoder"
    assert info["parameters"] == sum(p.numel() for p in hf.parameters())


def test_every_read_is_streamed_into_the_callers_buffer(parents):
    """Each tensor is read straight into the buffer it is asked into (no whole-checkpoint load):
    after reading half the tensors the reader has read half the bytes; a sharded set is read
    shard file by shard file through its index."""
    r = open_checkpoint(parents["llama"][0])
    assert len(r.files) == 3
    names = r.names()
    for n in names[: len(names) // 2]:
        buf = torch.empty(r.info(n).shape, dtype=r.info(n).dtype)
        assert r.get_into(n, buf) is buf
    assert 0.0 < r.read_fraction() < 1.0


# ---- writing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", FAMILIES)
def test_hf_to_ours_to_hf_is_bit_identical_and_loads_in_transformers(fam, parents, tmp_path):
    """HF -> ``convert --to metaseq`` at MP 2 with FSDP 2 -> ``convert --to hf`` (sharded at 40KB,
    with the index) -> ``AutoModelForCausalLM.from_pretrained``: the same tensors, bit for bit,
    and the same config."""
    d, _, hf, _ = parents[fam]
    mp = 1 if fam == "gemma" else 2  # Gemma's tiny parent has one k/v head
    ms = reshard(d, opts=_opts(tmp_path / "ms", mp=mp, fsdp=2))
    assert open_checkpoint(ms).mp == mp
    assert jam_ckpt(["convert", str(ms), "--to", "hf", "-o", str(tmp_path / "hf"), "--max-shard-size", "40KB",
                     "--quiet", "--no-hash-sources"]) == 0
    files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "hf" / "model.safetensors.index.json").is_file(), files
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(again) is type(hf)
    a, b = hf.state_dict(), again.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert hf_families.config_from_hf(again.config.to_dict()) == hf_families.config_from_hf(hf.config.to_dict())


def test_model_parallel_split_of_a_kv_head_is_refused_by_name(parents, tmp_path):
    with pytest.raises(ValueError, match=r"model-parallel size 2 does not divide its k/v heads \(num_key_value_heads\) \(1\)"):
        reshard(parents["gemma"][0], opts=_opts(tmp_path / "o", mp=2))
    assert not (tmp_path / "o").exists()


# ---- fusions --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("op", ["merge", "widen"])
def test_uniform_and_width_outputs_are_plain_hf_models_of_the_family(fam, op, parents, tmp_path):
    """Two HF parents -> jam-ckpt merge / widen -> convert --to hf: a plain ``*ForCausalLM`` (the
    widened one twice as wide, k/v heads doubled) that computes our fused model's logits."""
    da, db, _, _ = parents[fam]
    fused = merge([da, db], opts=_opts(tmp_path / "f")) if op == "merge" else \
        widen(da, db, opts=_opts(tmp_path / "f"), init="average")
    ours, cfg, _ = load_model(fused)
    out = reshard(fused, opts=_opts(tmp_path / "hf", format="hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == f"{ {'llama': 'Llama', 'qwen2': 'Qwen2', 'gemma': 'Gemma'}[fam]}ForCausalLM"
    assert hf.config.hidden_size == (64 if op == "widen" else 32)
    assert hf.config.num_key_value_heads == cfg.num_kv_heads
    torch.testing.assert_close(_logits(hf, TOKENS), _logits(ours, TOKENS), atol=ATOL, rtol=0)


@pytest.mark.parametrize("fam", FAMILIES)
def test_cross_of_two_hf_parents_preserves_each_and_is_refused_for_hf(fam, parents, tmp_path):
    da, db, ha, hb = parents[fam]
    out = cross(da, db, opts=_opts(tmp_path / "x"), cross_every=1, init="preserve", image_vocab=(LO, HI))
    model, cfg, _ = load_model(out)
    text = random_tokens(2, 10, low=4, high=LO, seed=3)
    image = random_tokens(2, 10, low=LO, high=HI, seed=4)
    with torch.no_grad():
        x_llm, _ = model.branch_features(text)
        _, x_img = model.branch_features(image)
    torch.testing.assert_close(x_llm, _hf_pre_norm(ha, text), atol=ATOL, rtol=0)
    torch.testing.assert_close(x_img, _hf_pre_norm(hb, image), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="JAM-Cross has no Hugging Face class"):
        reshard(out, opts=_opts(tmp_path / "hf", format="hf"))
    assert not (tmp_path / "hf").exists()


def _hf_pre_norm(hf, tokens: torch.Tensor) -> torch.Tensor:
    """The HF model's hidden state entering its final norm (B, T, E)."""
    seen = []
    h = hf.model.norm.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    try:
        _logits(hf, tokens)
    finally:
        h.remove()
    return seen[0]


def test_convert_help_says_jam_cross_is_our_layout_only(capsys):
    with pytest.raises(SystemExit):
        jam_ckpt(["convert", "--help"])
    assert "JAM-Cross has no HF class: it is written in our layout only" in " ".join(capsys.readouterr().out.split())


def test_parents_that_cannot_be_fused_are_refused_naming_the_field_and_the_fusion(parents, tmp_path):
    llama, gemma = parents["llama"][0], parents["gemma"][0]
    with pytest.raises(CheckpointError, match=r"has tie_embeddings=True.*no JAM fusion takes parents that differ in tie_embeddings"):
        merge([llama, gemma], opts=_opts(tmp_path / "m"))
    wide = tmp_path / "wide_llama"
    _save(hf_model("llama", seed=3, hidden_size=64, num_attention_heads=8), wide)
    with pytest.raises(CheckpointError, match=r"has embed_dim=64.*parents of different sizes fuse with JAM-Cross"):
        widen(llama, wide, opts=_opts(tmp_path / "w"))
    cross(llama, wide, opts=_opts(tmp_path / "ok"), image_vocab=(LO, HI))  # ... which JAM-Cross takes
    qwen = parents["qwen2"][0]
    with pytest.raises(CheckpointError, match=r"has qkv_bias=True.*no JAM fusion takes parents that differ"):
        merge([llama, qwen], opts=_opts(tmp_path / "q"))
    assert not any((tmp_path / n).exists() for n in ("m", "w", "q"))


# ---- vocabulary: the pad id and the rows a parent lacks -------------------------------------------
def _manifest(path: Path, *, extends: tuple[int, int] | None = None) -> Path:
    """An imported parent's manifest: tokenizer ids kept; 4 reserved ids as sentinels, one as
    <break>, one as <eoss>; image codes [96, 128)."""
    ids = TokenIds(size=128, bos=0, pad=1, eos=2, unk=3, text=(0, 96), image=(96, 128), break_id=9,
                   sentinels=(4, 8), eoss=8, extends=extends)
    VocabManifest.imported(ids, image_grid=(4, 8), image_tokens_per_image=32).save(path)
    return path


def test_an_hf_llama_without_pad_id_takes_its_manifests(tmp_path):
    d = _save(hf_model("llama", seed=4, pad_token_id=None), tmp_path / "nopad")
    with pytest.raises(CheckpointError, match="pad_token_id is null; name the padding id"):
        reshard(d, opts=_opts(tmp_path / "o"))
    vocab = _manifest(tmp_path / "vocab.json")
    out = reshard(d, opts=_opts(tmp_path / "o", vocab=vocab))
    model, cfg, v = load_model(out)
    assert cfg.padding_idx == 1 and v.explicit_ids is not None and v.sentinel_start == 4 and v.break_id == 9
    assert VocabManifest.load(out / "vocab.json") == VocabManifest.load(vocab)  # jam-ckpt records it
    back = reshard(out, opts=_opts(tmp_path / "hf", format="hf"))
    assert json.loads((back / "config.json").read_text())["pad_token_id"] == 1


def test_a_parent_gets_the_rows_its_manifest_adds(tmp_path):
    """Gemma beside Liquid in miniature: the LLM's embedding has the 96 text rows, the image
    parent's 128 (text + image codes); the manifest adds rows [96, 128) to the LLM, each the mean of
    its text rows (``vocab_rows``' ``text_mean``), and the output's manifest records it."""
    llm = _save(hf_model("llama", seed=5, vocab_size=96), tmp_path / "llm")
    img = _save(hf_model("llama", seed=6), tmp_path / "img")
    with pytest.raises(CheckpointError, match=r"has vocab_size=128.*ids.extends adds"):
        merge([llm, img], opts=_opts(tmp_path / "m"))
    vocab = _manifest(tmp_path / "vocab.json", extends=(96, 128))
    out = merge([llm, img], opts=_opts(tmp_path / "m", vocab=vocab))
    a = open_checkpoint(llm)
    b = open_checkpoint(img)
    got = open_checkpoint(out)
    for key in ("decoder.embed_tokens.weight", "decoder.output_projection.weight"):
        own, other = a.get(key), b.get(key)
        want = torch.cat([own, own.mean(0, keepdim=True).expand(32, -1)]) * 0.5 + other * 0.5
        torch.testing.assert_close(got.get(key), want, atol=1e-6, rtol=0)
    rec = json.loads((out / "manifest.json").read_text())["sources"][0]["vocab_rows"]
    assert rec["rows"] == [96, 128] and rec["init"] == "text_mean"
    assert sorted(rec["tensors"]) == ["decoder.embed_tokens.weight", "decoder.output_projection.weight"]

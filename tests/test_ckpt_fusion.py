"""checkpoints_tools fusion ops (paper §2.1.1-2.1.3) streamed from lazy parents: merge (JAM-Uniform),
widen (JAM-Width), cross (JAM-Cross); outputs load into the core models with strict=True."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch

from checkpoints_tools import load_model
from checkpoints_tools.io import OutputSpec
from checkpoints_tools.ops import CommonOptions, cross, merge, widen
from checkpoints_tools.readers import open_checkpoint
from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.fusion import cross_tensor, state_shapes, widen_tensor
from jam_metaseq.models import build_model
from jam_metaseq.models.config import cross_of, width_of
from jam_metaseq.vocab import tiny_manifest
import _ckpt_golden as _golden
from _ckpt_util import assert_state_equal, save_metaseq, tiny_parent

torch.set_num_threads(1)


def _opts(out: Path, **kw) -> CommonOptions:
    return CommonOptions(spec=OutputSpec(out_dir=out, **kw), progress=False, hash_sources=False)


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    d = tmp_path_factory.mktemp("parents")
    cfg, a = tiny_parent(1)
    _, b = tiny_parent(2)
    # LLM parent as MP=2 parts, image parent as FSDP shards: the ops must not care.
    pa = save_metaseq(d / "llm", cfg, a, mp=2)
    pb = save_metaseq(d / "img", cfg, b, fsdp=2)
    return cfg, a, b, pa, pb


def _tokens(lo: int, hi: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(lo, hi, (2, 7), generator=torch.Generator().manual_seed(seed))


def test_merge_of_identical_parents_is_the_parent(tmp_path, parents):
    cfg, a, _, pa, _ = parents
    out = merge([pa, pa], opts=_opts(tmp_path / "m"))  # Eq. 1: 0.5 a + 0.5 a is exact in fp32
    got = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    assert_state_equal(got, a)
    out3 = merge([pa, pa, pa], opts=_opts(tmp_path / "m3"))  # thirds round: equal to 1 ulp
    got3 = torch.load(out3 / "checkpoint.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(got3[k], a[k], rtol=1e-6, atol=1e-7)


def test_merge_weights_match_a_whole_state_dict_reference(tmp_path, parents):
    cfg, a, b, pa, pb = parents
    out = merge([pa, pb], opts=_opts(tmp_path / "m", mp=2), weights=[0.25, 0.75])
    got = collections.OrderedDict(open_checkpoint(out).items())
    for k in a:
        if k.endswith("version"):
            continue
        torch.testing.assert_close(got[k], 0.25 * a[k] + 0.75 * b[k], rtol=0, atol=1e-6)
    model, mcfg, _ = load_model(out)
    assert mcfg.arch == "jam_uniform" and mcfg.embed_dim == cfg.embed_dim


def test_widen_loads_strict_and_gives_reference_logits(tmp_path, parents):
    cfg, a, b, pa, pb = parents
    for init in ("copy", "average"):
        out = widen(pa, pb, opts=_opts(tmp_path / f"w_{init}", mp=2), init=init)
        model, wcfg, _ = load_model(out)
        assert wcfg == width_of(cfg)
        ref = build_model(wcfg)
        ref.load_state_dict({k: widen_tensor(k, a[k], b[k], parent=cfg, init=init)
                             for k in state_shapes(wcfg)}, strict=True)
        x = _tokens(4, cfg.vocab_size)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_widen_rejects_parents_of_different_depth(tmp_path, parents):
    cfg, a, _, pa, _ = parents
    cfg3, c = tiny_parent(3, layers=3)
    pc = save_metaseq(tmp_path / "deep", cfg3, c)
    with pytest.raises(CheckpointError, match=r"deep.*img parent has layers=3.*has 2"):
        widen(pa, pc, opts=_opts(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
    cfgv, v = tiny_parent(4, vocab_size=136)
    pv = save_metaseq(tmp_path / "vocab", cfgv, v)
    with pytest.raises(CheckpointError, match="vocab_size=136"):
        merge([pa, pv], opts=_opts(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


def test_cross_preserve_reproduces_each_parent_branch(tmp_path, parents):
    cfg, a, b, pa, pb = parents
    vocab = tiny_manifest(text_size=60, image_codes=56)  # size 128 = the tiny embedding
    vpath = tmp_path / "vocab.json"
    vocab.save(vpath)
    opts = _opts(tmp_path / "x", mp=2, fsdp=2)
    opts.vocab = str(vpath)
    out = cross(pa, pb, opts=opts, cross_every=1, init="preserve", seed=5)
    model, ccfg, v = load_model(out)
    assert v == vocab and (ccfg.image_vocab_start, ccfg.image_vocab_end) == (vocab.image_start, vocab.image_end)
    assert (out / "vocab.json").is_file()
    assert len(ccfg.cross_after) == 2

    def pre_final_ln(state, tokens):
        m = build_model(cfg)
        m.load_state_dict(state, strict=True)
        seen = {}
        m.decoder.layer_norm.register_forward_pre_hook(lambda mod, inp: seen.setdefault("x", inp[0]))
        with torch.no_grad():
            m(tokens)
        return seen["x"]

    text = _tokens(vocab.text_start, vocab.text_end)
    image = _tokens(vocab.image_start, vocab.image_end, seed=1)
    with torch.no_grad():
        x_llm, _ = model.branch_features(text)
        _, x_img = model.branch_features(image)
    torch.testing.assert_close(x_llm, pre_final_ln(a, text), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_img, pre_final_ln(b, image), rtol=1e-5, atol=1e-5)
    # negative control: the LLM branch does not reproduce the image parent
    assert not torch.allclose(x_llm, pre_final_ln(b, text), atol=1e-3)


def test_cross_paper_init_equals_in_memory_reference(tmp_path, parents):
    cfg, a, b, pa, pb = parents
    out = cross(pa, pb, opts=_opts(tmp_path / "x"), cross_every=2, init="paper", seed=3, image_vocab=(64, 96))
    ccfg = cross_of(cfg, 2, cross_init="paper", image_vocab_start=64, image_vocab_end=96)
    got = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    for k in state_shapes(ccfg):
        want = cross_tensor(k, cfg=ccfg, llm=a.__getitem__, img=b.__getitem__, seed=3)
        assert torch.equal(got[k], want.to(got[k].dtype)), k
    emb = got["decoder.embed_tokens.weight"]
    assert torch.equal(emb[64:96], b["decoder.embed_tokens.weight"][64:96])
    assert torch.equal(emb[:64], a["decoder.embed_tokens.weight"][:64])


def test_cross_without_image_range_is_refused(tmp_path, parents):
    _, _, _, pa, pb = parents
    with pytest.raises(CheckpointError, match="image-code range"):
        cross(pa, pb, opts=_opts(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_fp16_parents_give_fp16_output_with_fp32_math(tmp_path):
    cfg, a = tiny_parent(7)
    _, b = tiny_parent(8)
    ha = collections.OrderedDict((k, v.half()) for k, v in a.items())
    hb = collections.OrderedDict((k, v.half()) for k, v in b.items())
    pa = save_metaseq(tmp_path / "a", cfg, ha)
    pb = save_metaseq(tmp_path / "b", cfg, hb)
    out = merge([pa, pb], opts=_opts(tmp_path / "m"))
    got = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    k = "decoder.layers.0.fc1.weight"
    assert got[k].dtype == torch.float16
    assert torch.equal(got[k], ((ha[k].float() + hb[k].float()) / 2).half())
    pf = save_metaseq(tmp_path / "f", cfg, a)  # fp32 parent next to fp16 ones
    with pytest.raises(CheckpointError, match="different dtypes.*--dtype"):
        merge([pa, pf], opts=_opts(tmp_path / "m2"))
    out = merge([pa, pf], opts=_opts(tmp_path / "m3", dtype=torch.bfloat16))
    assert open_checkpoint(out).param_dtype == torch.bfloat16


def test_load_model_reads_a_fairseq_trained_checkpoint(tmp_path, parents):
    """fairseq saves cfg["model"] (a Namespace with jam_config), task_state (vocab manifest,
    jam_config), optimizer state and meters; load_model needs only the safe parts."""
    import argparse

    from jam_metaseq.models.config import uniform_of

    cfg, a, _, _, _ = parents
    ucfg = uniform_of(cfg)
    vocab = tiny_manifest(text_size=60, image_codes=56)
    ckpt = {
        "model": a,
        "cfg": {"model": argparse.Namespace(arch="jam_uniform_tiny", jam_config=ucfg.to_dict()),
                "task": {"_name": "cm3_multimodal"}},
        "task_state": {"vocab_manifest": vocab.to_dict(), "jam_config": ucfg.to_dict()},
        "optimizer_history": [{"criterion_name": "Cm3Criterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": None}, "num_updates": 10}],
        "extra_state": {"train_iterator": {"epoch": 1}, "metrics": {}, "previous_training_time": 1.5},
        "last_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": [1e-4]}]},
    }
    torch.save(ckpt, tmp_path / "checkpoint_last.pt")
    model, got_cfg, got_vocab = load_model(tmp_path / "checkpoint_last.pt")
    assert got_cfg == ucfg and got_vocab == vocab
    ref = build_model(cfg)
    ref.load_state_dict(a, strict=True)
    x = _tokens(4, cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


# ---- outputs recorded before a change (tests/data/ckpt_golden.json) ----------------------------

_GOLDEN = json.loads(_golden.DATA.read_text())


@pytest.fixture(scope="module")
def golden_parents(tmp_path_factory):
    return _golden.make_parents(tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("case", sorted(_GOLDEN["cases"]))
def test_outputs_equal_the_recorded_digests(tmp_path, golden_parents, case):
    """Every fusion path (merge, widen copy/average, cross paper/preserve) x layout (.pt MP=1,
    MP=2, safetensors) writes the files whose sha256s were recorded before the fusion math and
    the writers were reworked (``tests/_ckpt_golden.py`` says how they were recorded). A JAM-Cross
    case's drawn tensors depend on the CPU's ``torch.randn`` kernel: its files are compared where
    that kernel's fingerprint was recorded (AVX2 and DEFAULT dispatch), its other tensors always."""
    op, lay = case.split("/")
    want = _GOLDEN["cases"][case]
    out = _golden.run_case(op, lay, *golden_parents, tmp_path / "out")
    got = _golden.digest_output(out, op)
    if "drawn" in want:
        assert got["fixed_tensors"] == want["fixed_tensors"], f"{case}: the copied/constant tensors changed"
        fp, rec = next(iter(got.pop("drawn").items()))
        if fp not in want["drawn"]:
            pytest.xfail(f"{case}: this CPU's torch.randn kernel ({fp[:12]}) was not recorded; "
                         "only the tensors that are not drawn were compared (they match)")
        want = want["drawn"][fp]
        got = rec
    assert got["tensors"] == want["tensors"], f"{case}: the tensors changed"
    assert got["files"] == want["files"], f"{case}: the files changed (same tensors: a writer change)"


def test_cross_records_its_init_seed_scheme_and_per_tensor_reproduces_older_outputs(tmp_path, golden_parents):
    """The manifest says how the new weights were drawn (parameters.init_seed_scheme); the default
    is per-block; --init-seed-scheme per-tensor gives the bytes jam-ckpt wrote before the scheme
    existed (the recorded digests); the two differ in the drawn tensors only."""
    from checkpoints_tools.cli import main as jam_ckpt

    pa, pb = golden_parents
    outs = {}
    for scheme in ("per-block", "per-tensor"):
        argv = ["cross", "--llm", str(pa), "--img", str(pb), "--cross-every", "1", "--seed", "7", "--image-vocab",
                "64", "100", "--hash-sources", "none", "--quiet", "-o", str(tmp_path / scheme)]
        if scheme == "per-tensor":
            argv += ["--init-seed-scheme", "per-tensor"]
        assert jam_ckpt(argv) == 0
        m = json.loads((tmp_path / scheme / "manifest.json").read_text())
        assert m["parameters"]["init_seed_scheme"] == scheme
        outs[scheme] = collections.OrderedDict(open_checkpoint(tmp_path / scheme).items())
    want = _GOLDEN["cases"]["cross-paper/metaseq-mp1"]["drawn"].get(_golden.randn_fingerprint())
    if want is not None:
        assert _golden.digest_output(tmp_path / "per-tensor", "cross-paper")["drawn"] == {
            _golden.randn_fingerprint(): want}
    drawn = set(_golden.random_names(list(outs["per-block"]), "paper"))
    assert drawn
    for k in outs["per-block"]:
        assert torch.equal(outs["per-block"][k], outs["per-tensor"][k]) != (k in drawn), k
    with pytest.raises(CheckpointError, match="init seed scheme must be one of"):
        cross(pa, pb, opts=_opts(tmp_path / "bad"), image_vocab=(64, 100), init_seed_scheme="per-thread")

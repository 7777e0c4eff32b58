"""``jam-ckpt cross`` of parents of different sizes (issue 17), streamed from lazy parents in any
layout into any model-parallel size: tensors equal the in-memory fusion (``jam_metaseq.fusion``),
``preserve`` reproduces each parent in its branch, ``inspect`` prints the layer alignment, bad
pairs are refused before anything is written, and the fairseq host loads the output strictly and
trains it end to end (``fairseq-train``, two parents of different widths and depths)."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pytest
import torch

from _ckpt_util import save_metaseq, tiny_parent
from checkpoints_tools import load_model
from checkpoints_tools.io import OutputSpec
from checkpoints_tools.ops import CommonOptions, cross, reshard
from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.fusion import cross_tensor, state_shapes
from jam_metaseq.models import build_model, keys
from jam_metaseq.models.config import cross_of
from jam_metaseq.vocab import tiny_manifest

torch.set_num_threads(1)
VOCAB = tiny_manifest(text_size=60, image_codes=56)  # 128 ids: the tiny embedding
LO, HI = VOCAB.image_start, VOCAB.image_end
IMG_SHAPE = dict(embed_dim=16, ffn_dim=48, heads=2, layers=3)  # narrower and shallower than the LLM


def _opts(out: Path, **kw) -> CommonOptions:
    o = CommonOptions(spec=OutputSpec(out_dir=out, **kw), progress=False, hash_sources=False)
    return o


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    d = tmp_path_factory.mktemp("asym_parents")
    cfg_a, a = tiny_parent(1, layers=4)
    cfg_b, b = tiny_parent(2, **IMG_SHAPE)
    VOCAB.save(d / "vocab.json")
    # LLM parent as MP=2 parts, image parent as FSDP shards: the op must not care.
    return cfg_a, cfg_b, a, b, save_metaseq(d / "llm", cfg_a, a, mp=2), save_metaseq(d / "img", cfg_b, b, fsdp=2), \
        d / "vocab.json"


def _pre_final_ln(cfg, state, tokens):
    m = build_model(cfg)
    m.load_state_dict(state, strict=True)
    seen = {}
    m.decoder.layer_norm.register_forward_pre_hook(lambda mod, inp: seen.setdefault("x", inp[0]))
    with torch.no_grad():
        m(tokens)
    return seen["x"]


@pytest.mark.parametrize("mp,fsdp", [(1, 0), (2, 0), (2, 2)])
def test_paper_init_equals_the_in_memory_fusion_at_any_mp(tmp_path, parents, mp, fsdp):
    cfg_a, cfg_b, a, b, pa, pb, _ = parents
    out = cross(pa, pb, opts=_opts(tmp_path / "x", mp=mp, fsdp=fsdp), cross_every=1, init="paper", seed=3,
                image_vocab=(LO, HI))
    model, ccfg, _ = load_model(out)
    want_cfg = cross_of(cfg_a, 1, image_vocab_start=LO, image_vocab_end=HI, image_parent=cfg_b)
    assert ccfg == want_cfg and not ccfg.symmetric
    got = model.state_dict()
    assert list(got) == keys.state_keys(ccfg)
    for k in state_shapes(ccfg):
        want = cross_tensor(k, cfg=ccfg, llm=a.__getitem__, img=b.__getitem__, seed=3)
        assert torch.equal(got[k], want.to(got[k].dtype)), k
    # MP=2 parts reshard back to the consolidated model, bit for bit
    if mp == 2:
        back, _, _ = load_model(reshard(out.parent if out.is_file() else out, opts=_opts(tmp_path / "r")))
        for k, v in back.state_dict().items():
            assert torch.equal(v, got[k]), k


def test_preserve_reproduces_each_parent_on_any_tokens(tmp_path, parents):
    cfg_a, cfg_b, a, b, pa, pb, vpath = parents
    opts = _opts(tmp_path / "x", mp=2)
    opts.vocab = str(vpath)
    out = cross(pa, pb, opts=opts, cross_every=1, init="preserve", seed=5)
    model, ccfg, v = load_model(out)
    assert v == VOCAB and ccfg.cross_pairs == [(0, 0), (1, 1), (3, 2)]  # 4*(i+1)//3 - 1 for i < 3
    tokens = torch.randint(4, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x_llm, x_img = model.branch_features(tokens)
    torch.testing.assert_close(x_llm, _pre_final_ln(cfg_a, a, tokens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_img, _pre_final_ln(cfg_b, b, tokens), rtol=1e-5, atol=1e-5)


def test_inspect_prints_the_branches_and_the_alignment(tmp_path, parents, capsys):
    from checkpoints_tools.cli import main

    _, _, _, _, pa, pb, vpath = parents
    out = tmp_path / "x"
    assert main(["cross", "--llm", str(pa), "--img", str(pb), "--cross-every", "2", "--vocab", str(vpath),
                 "-o", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"shape\s+layers=4 embed=32 ffn=64 heads=4", text), text
    assert re.search(r"image branch\s+layers=3 embed=16 ffn=48 heads=2 output width=32", text), text
    assert re.search(r"cross pairs\s+0:0 3:2  \(LLM layer:image layer\)", text), text
    assert re.search(r"embedding rows\s+128", text), text


def test_bad_pairs_are_refused_before_writing(tmp_path, parents):
    cfg_a, _, _, _, pa, pb, _ = parents
    cfg_v, v = tiny_parent(3, vocab_size=136, **IMG_SHAPE)
    pv = save_metaseq(tmp_path / "v", cfg_v, v)
    with pytest.raises(CheckpointError, match="vocab_size=136"):
        cross(pa, pv, opts=_opts(tmp_path / "o1"), image_vocab=(LO, HI))
    cfg_g, g = tiny_parent(4, activation="gelu", **IMG_SHAPE)
    pg = save_metaseq(tmp_path / "g", cfg_g, g)
    with pytest.raises(CheckpointError, match="activation='gelu'.*share it"):
        cross(pa, pg, opts=_opts(tmp_path / "o2"), image_vocab=(LO, HI))
    # MP 4 splits the LLM's 4 heads but not the image branch's 2
    with pytest.raises(ValueError, match=r"\(image branch\).*model-parallel size 4 does not divide its attention heads"):
        cross(pa, pb, opts=_opts(tmp_path / "o3", mp=4), image_vocab=(LO, HI))
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3"))


# ---- the fairseq host ------------------------------------------------------------------------------
def _host_args(**flags) -> argparse.Namespace:
    from jam_metaseq import flags as jam_flags
    from jam_metaseq.hosts import args as jam_args

    p = argparse.ArgumentParser()
    jam_flags.add_model_args(p)
    ns = p.parse_args([])
    for k, v in flags.items():
        setattr(ns, k, v)
    jam_args.apply_arch_defaults(ns, family="jam_cross", size="tiny")
    return ns


def test_host_flags_round_trip_and_strict_fairseq_load(tmp_path, parents):
    pytest.importorskip("fairseq")
    from fairseq.data import Dictionary  # noqa: F401

    from jam_metaseq import flags as jam_flags
    from jam_metaseq.hosts import args as jam_args
    from jam_metaseq.hosts.fairseq import JamLanguageModel, dictionary_from_manifest

    cfg_a, cfg_b, _, _, pa, pb, vpath = parents
    opts = _opts(tmp_path / "x")
    opts.vocab = str(vpath)
    out = cross(pa, pb, opts=opts, cross_every=1, init="paper", seed=1)
    ns = _host_args(decoder_layers=4, cross_every=1, img_embed_dim=16, img_ffn_embed_dim=48, img_layers=3,
                    img_attention_heads=2)
    cfg = jam_flags.config_from_args(ns, vocab_size=VOCAB.size, image_range=(LO, HI))
    assert cfg.img == cfg_b and cfg.llm == cfg_a
    flags = jam_flags.args_from_config(cfg)
    assert flags["img_layers"] == 3
    words = jam_flags.command_line_from_config(cfg)  # a training command carries the image branch's shape
    assert words[words.index("--img-embed-dim") + 1] == "16" and words[words.index("--img-layers") + 1] == "3"
    assert jam_flags.config_from_args(argparse.Namespace(**flags), vocab_size=VOCAB.size,
                                     image_range=(LO, HI)).to_dict() == cfg.to_dict()
    # the symmetric model's flags stay as they were: no image-branch flags
    sym = jam_flags.config_from_args(_host_args(cross_every=1), vocab_size=VOCAB.size)
    assert not any(k.startswith("img_") for k in jam_flags.args_from_config(sym))
    with pytest.raises(ValueError, match="--img-layers: the image-branch shape flags .* are JAM-Cross flags"):
        ns2 = _host_args(img_layers=3)
        ns2.jam_family = "jam_width"
        jam_flags.config_from_args(ns2, vocab_size=VOCAB.size)

    task = argparse.Namespace(vocab=VOCAB, target_dictionary=dictionary_from_manifest(VOCAB))
    model = JamLanguageModel.build_model(ns, task)
    start = torch.load(out / "checkpoint.pt", weights_only=False)
    assert start["cfg"]["model"].img_embed_dim == 16  # the written host flags carry the image branch
    model.load_state_dict(start["model"], strict=True)
    model.eval()
    tokens = torch.randint(4, VOCAB.size, (2, 9))
    tokens[1, :3] = 1
    ref, _, _ = load_model(out)
    logits, _ = model(tokens)
    torch.testing.assert_close(logits, ref(tokens), atol=0, rtol=0)


def test_e2e_fairseq_train_from_parents_of_different_widths_and_depths(tmp_path):
    """Two tiny parents (LLM: E=32, 4 layers, 4 heads; image: E=16, 3 layers, 2 heads) crossed by
    ``jam-ckpt cross``, then 30 CM3 updates with ``fairseq-train`` (the loss falls) and
    ``fairseq-validate`` (text and image perplexities)."""
    pytest.importorskip("fairseq")
    import subprocess
    import sys

    from _hosts_util import USER_DIR, make_data, run_cli, train_losses
    from _hosts_util import VOCAB as HV
    from jam_metaseq.models.config import preset

    data = make_data(tmp_path / "data")
    parents = {}
    for name, seed, shape in (("llm", 11, dict(layers=4)), ("img", 22, IMG_SHAPE)):
        cfg = preset("tiny", vocab_size=HV.size, **shape)
        torch.manual_seed(seed)
        p = tmp_path / f"{name}.pt"
        torch.save({"model": build_model(cfg).state_dict(), "jam_config": cfg.to_dict(),
                    "cfg": {"model": argparse.Namespace(_name="transformer_lm", arch="transformer_lm")}}, p)
        parents[name] = p
    HV.save(tmp_path / "vocab.json")
    res = subprocess.run([sys.executable, "-m", "checkpoints_tools.cli", "cross", "--llm", str(parents["llm"]),
                          "--img", str(parents["img"]), "--cross-every", "1", "--vocab", str(tmp_path / "vocab.json"),
                          "-o", str(tmp_path / "start"), "--quiet"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    common = ["--user-dir", USER_DIR, "--task", "cm3_multimodal", "--cpu", "--num-workers", "0",
              "--tokens-per-sample", "32"]
    arch = ["--arch", "jam_cross_tiny", "--cross-every", "1", "--decoder-layers", "4", "--img-embed-dim", "16",
            "--img-ffn-embed-dim", "48", "--img-layers", "3", "--img-attention-heads", "2"]
    res = run_cli("fairseq-train", str(data), *common, *arch, "--criterion", "cm3", "--seed", "1",
                  "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "polynomial_decay", "--warmup-updates", "3",
                  "--total-num-update", "30", "--log-format", "json", "--log-interval", "1", "--disable-validation",
                  "--no-epoch-checkpoints", "--batch-size", "4", "--max-tokens", "256", "--max-update", "30",
                  "--save-dir", str(tmp_path / "run"), "--restore-file", str(tmp_path / "start" / "checkpoint.pt"),
                  "--reset-optimizer", "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler")
    curve = train_losses(res.stdout + res.stderr)
    assert sorted(curve) == list(range(1, 31))
    first = sum(curve[u] for u in range(1, 6)) / 5
    last = sum(curve[u] for u in range(26, 31)) / 5
    assert last < first - 0.5, f"loss did not fall: first {first:.3f}, last {last:.3f}"
    res = run_cli("fairseq-validate", str(data), "--path", str(tmp_path / "run" / "checkpoint_last.pt"), *common,
                  "--batch-size", "4", "--valid-subset", "valid")
    found = {k: float(v) for k, v in re.findall(r"\| (text_ppl|image_ppl|ppl) ([0-9.e+-]+)", res.stdout + res.stderr)}
    assert {"text_ppl", "image_ppl", "ppl"} <= set(found)
    assert all(math.isfinite(x) and 1.0 < x < HV.size for x in found.values()), found
    # the trained checkpoint is still the asymmetric model
    trained, tcfg, _ = load_model(tmp_path / "run" / "checkpoint_last.pt")
    assert (tcfg.img.embed_dim, tcfg.img.layers, tcfg.llm.layers) == (16, 3, 4)


def test_generation_and_evaluation_load_the_output(tmp_path, parents):
    """jam-generate and jam-eval load through ``load_model`` (the one loader) as they call it:
    the file of an asymmetric output (no shared embedding), its vocabulary required, another
    dtype: the same model as the directory's."""
    _, _, _, _, pa, pb, vpath = parents
    opts = _opts(tmp_path / "x")
    opts.vocab = str(vpath)
    out = cross(pa, pb, opts=opts, cross_every=2, init="paper", seed=2)
    ref, cfg, _ = load_model(out)
    assert not cfg.shared_embedding
    tokens = torch.randint(4, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    gen, _, vocab = load_model(out / "checkpoint.pt", vocab=vpath, require_vocab=True, dtype=torch.float64)
    assert vocab is not None and next(gen.parameters()).dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(gen(tokens).float(), ref(tokens), rtol=1e-4, atol=1e-5)


def test_config_is_inferred_from_shapes_and_host_flags(tmp_path, parents):
    """A checkpoint without ``jam_config`` (host flags only): the image branch's shape comes from
    its tensors and ``img_attention_heads``."""
    from checkpoints_tools.readers import infer_config

    _, _, _, _, pa, pb, _ = parents
    out = cross(pa, pb, opts=_opts(tmp_path / "x"), cross_every=2, init="paper", image_vocab=(LO, HI))
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    ns = state["cfg"]["model"]
    want = load_model(out)[1]
    shapes = {k: tuple(v.shape) for k, v in state["model"].items()}
    assert infer_config(shapes, ns) == want
    del ns.cross_every  # from the number of cross pairs on the shallower (3-layer) branch
    assert infer_config(shapes, ns) == want
    del ns.img_attention_heads  # the LLM's 4 heads would divide the width 16: never guessed
    with pytest.raises(CheckpointError, match="image branch .3 layers, width 16. differs from the LLM's and its "
                                              "attention heads are not stored"):
        infer_config(shapes, ns)

"""Host adapters in-process: flags <-> configs, registration, the fairseq model wrapper, the
cm3_multimodal items (JAM §2.1, §3.1)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _hosts_util import (
    LIBRARY, USER_DIR, VOCAB, fresh_interpreter, fused_checkpoint, installed_copy, library_after_host_registers,
    library_leaves_host_alone, make_data, user_dir_registers,
)
from jam_metaseq import flags as jam_flags
from jam_metaseq.hosts import args as jam_args
from jam_metaseq.task.items import (
    CM3Items, DataSetupError, TaskOptions, collate, find_sources, load_manifest, parse_mixture,
)
from jam_metaseq.hosts.compat import check_start_checkpoint
from jam_metaseq.data.binarize import open_dataset
from jam_metaseq.models import build_model, count_parameters
from jam_metaseq.models.config import PRESETS, CrossConfig
from jam_metaseq.objectives.cm3 import CM3Config, cm3_inverse


def _filled(arch: str, **flags) -> argparse.Namespace:
    family, size = jam_args.arch_names()[arch]
    p = argparse.ArgumentParser()
    jam_flags.add_model_args(p)
    ns = p.parse_args([])
    for k, v in flags.items():
        setattr(ns, k, v)
    jam_args.apply_arch_defaults(ns, family=family, size=size)
    return ns


# ---- flags <-> configs -------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(jam_args.arch_names()))
def test_args_config_round_trip(arch):
    cfg = jam_flags.config_from_args(_filled(arch), vocab_size=VOCAB.size)
    back = argparse.Namespace(**jam_flags.args_from_config(cfg))
    assert jam_flags.config_from_args(back, vocab_size=VOCAB.size).to_dict() == cfg.to_dict()


def test_sized_archs_match_the_paper():
    c7 = PRESETS["cm3leon_7b"]
    width = jam_flags.config_from_args(_filled("jam_width_7b"), vocab_size=c7.vocab_size)
    assert (width.embed_dim, width.layers, width.bias, width.affine_ln) == (8192, 32, False, False)
    cross = jam_flags.config_from_args(_filled("jam_cross_7b"), vocab_size=c7.vocab_size)
    assert isinstance(cross, CrossConfig) and cross.cross_every == 2 and len(cross.cross_after) == 16
    assert jam_flags.config_from_args(_filled("jam_cross"), vocab_size=100).parent.embed_dim == 4096
    none = jam_flags.config_from_args(_filled("jam_cross_7b", cross_every=0), vocab_size=c7.vocab_size)
    assert none.cross_after == []  # Table 4 "no cross-attention"
    # flags given by the user win over the arch
    ns = _filled("jam_uniform_tiny", decoder_layers=3, disable_bias=True)
    cfg = jam_flags.config_from_args(ns, vocab_size=VOCAB.size)
    assert cfg.layers == 3 and cfg.bias is False and cfg.embed_dim == PRESETS["tiny"].embed_dim
    assert ns.decoder_learned_pos and ns.share_decoder_input_output_embed  # metaseq requires both


def test_cross_parameter_counts_follow_table_4():
    """Paper: 13B (no cross), 16B / 19B / 26B with a cross pair every 4 / 2 / 1 layers."""
    vocab = PRESETS["cm3leon_7b"].vocab_size
    counts = {k: count_parameters(jam_flags.config_from_args(_filled("jam_cross_7b", cross_every=k),
                                                            vocab_size=vocab)) / 1e9 for k in (0, 4, 2, 1)}
    for k, paper in ((0, 13), (4, 16), (2, 19), (1, 26)):  # the paper's rounded sizes
        assert abs(counts[k] - paper) < 1.0, counts


def test_stored_config_wins_and_vocab_must_match():
    cfg = jam_flags.config_from_args(_filled("jam_width_tiny"), vocab_size=VOCAB.size)
    ns = _filled("jam_uniform_7b")
    ns.jam_config = cfg.to_dict()
    assert jam_flags.config_from_args(ns, vocab_size=VOCAB.size).to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match="vocab manifest has 120 ids but the checkpoint's embedding has 112 rows"):
        jam_flags.config_from_args(ns, vocab_size=120)
    with pytest.raises(ValueError, match="no JAM family"):
        jam_flags.config_from_args(argparse.Namespace(), vocab_size=VOCAB.size)


# ---- data items --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("hostdata"))


def _items(data: Path, split: str, **kw) -> CM3Items:
    sources = {n: open_dataset(p) for n, p in find_sources(data, split).items()}
    opts = TaskOptions(data=str(data), tokens_per_sample=32, cm3=CM3Config(min_spans=1, max_spans=4), **kw)
    return CM3Items(sources, vocab=VOCAB, opts=opts, train=split == "train")


def test_items_are_deterministic_per_epoch_and_cm3_invertible(data):
    a, b = _items(data, "train"), _items(data, "train")
    infilling = 0
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x["source"], y["source"]) and torch.equal(x["weights"], y["weights"])
        assert x["source"].numel() <= 32
        full = torch.cat([x["source"][:1], x["target"]]).numpy()
        infilling += bool(VOCAB.is_sentinel(full).any())
        restored = cm3_inverse(full, vocab=VOCAB)
        assert not VOCAB.is_sentinel(restored).any() and restored.size == full.size - 3 * (
            VOCAB.is_sentinel(full).sum() // 2)
    assert infilling > len(a) // 2  # min_spans=1: all but too-short blocks become infilling items
    seq0 = [a[i]["source"] for i in range(len(a))]
    a.set_epoch(2)
    assert any(not torch.equal(s, a[i]["source"]) for i, s in enumerate(seq0))


def test_mixture_weights_and_valid_coverage(data):
    sizes = {n: open_dataset(p).sizes.sum() for n, p in find_sources(data, "train").items()}
    items = _items(data, "train", mixture={"text": 3.0, "caption": 1.0}, epoch_items=60)
    tokens = {"text": 0, "caption": 0}
    for j in range(len(items)):
        name = items.names[int(items._src[j])]
        tokens[name] += int(items.sources[name].sizes[items._idx[j]])
    share = tokens["text"] / sum(tokens.values())
    assert abs(share - 0.75) < 0.03, (share, sizes)
    valid = _items(data, "valid")
    n = sum(len(s) for s in valid.sources.values())
    assert len(valid) == n
    seen = {(int(s), int(i)) for s, i in zip(valid._src, valid._idx)}
    assert len(seen) == n  # every block once
    item = valid[0]
    assert not VOCAB.is_sentinel(item["source"]).any()  # validation is plain LM
    with pytest.raises(DataSetupError, match="--mixture names"):
        _items(data, "train", mixture={"nope": 1.0})


def test_collate_pads_right_with_zero_weight():
    s = [{"id": 0, "source": torch.tensor([5, 6, 7]), "target": torch.tensor([6, 7, 2]),
          "weights": torch.ones(3)},
         {"id": 1, "source": torch.tensor([8]), "target": torch.tensor([2]), "weights": torch.ones(1)}]
    b = collate(s, pad=1)
    assert b["net_input"]["src_tokens"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert b["target"].tolist() == [[6, 7, 2], [2, 1, 1]]
    assert b["loss_weights"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["ntokens"] == 4 and b["nsentences"] == 2


def test_data_errors_name_the_path(tmp_path):
    with pytest.raises(DataSetupError, match="data directory not found"):
        load_manifest(tmp_path / "missing")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataSetupError, match="no binarized source"):
        find_sources(tmp_path, "train")
    assert parse_mixture("text=1, caption=2") == {"text": 1.0, "caption": 2.0}
    with pytest.raises(ValueError, match="NAME=WEIGHT"):
        parse_mixture("text")


def test_start_checkpoint_check(tmp_path):
    from jam_metaseq.vocab import tiny_manifest

    path = fused_checkpoint("jam_uniform", tmp_path, use_cli=False)
    cfg = jam_flags.config_from_args(_filled("jam_uniform_tiny"), vocab_size=VOCAB.size)
    check_start_checkpoint(path, config=cfg, vocab=VOCAB)  # fits
    big = tiny_manifest(text_size=72)
    with pytest.raises(ValueError, match=f"vocab manifest has {big.size} ids but the checkpoint"):
        check_start_checkpoint(path, config=cfg, vocab=big)
    wide = jam_flags.config_from_args(_filled("jam_width_tiny"), vocab_size=VOCAB.size)
    with pytest.raises(ValueError, match="has shape .* but the model .* expects"):
        check_start_checkpoint(path, config=wide, vocab=VOCAB)
    with pytest.raises(ValueError, match="written for model-parallel size 1, the run uses --model-parallel-size 2"):
        check_start_checkpoint(path, config=cfg, vocab=VOCAB, model_parallel_size=2)


# ---- the fairseq wrapper -------------------------------------------------------------------------
def test_fairseq_model_is_the_core_model(tmp_path, data):
    pytest.importorskip("fairseq")
    from jam_metaseq.hosts import register_hosts
    from jam_metaseq.hosts.fairseq import JamLanguageModel, dictionary_from_manifest

    assert "fairseq" in register_hosts(import_hosts=True)
    register_hosts(import_hosts=True)  # a second time is a no-op
    ns = _filled("jam_cross_tiny", cross_every=1, dropout=0.1)
    task = argparse.Namespace(vocab=VOCAB, target_dictionary=dictionary_from_manifest(VOCAB))
    model = JamLanguageModel.build_model(ns, task)
    assert ns.jam_config["type"] == "CrossConfig"  # carried into checkpoints with cfg["model"]
    core = model.decoder.core
    assert list(model.state_dict()) == list(core.state_dict())  # metaseq keys, same order
    start = torch.load(fused_checkpoint("jam_cross", tmp_path, cross_every=1, use_cli=False), weights_only=False)["model"]
    model.load_state_dict(start, strict=True)
    model.eval()
    tokens = torch.randint(4, VOCAB.size, (2, 9))
    tokens[1, :3] = 1  # left padding
    logits, _ = model(tokens)
    assert not core.training
    assert torch.allclose(logits, core(tokens), atol=0)
    model.train()
    assert core.training and core.decoder.training


def test_fairseq_criterion_is_cm3_loss():
    """The criterion (``hosts.common.CM3CriterionMixin``) = ``objectives.loss.cm3_loss`` on the
    model's logits, with the batch's loss weights, sentinel weight and padding."""
    pytest.importorskip("fairseq")
    from jam_metaseq.hosts import register_hosts
    from jam_metaseq.hosts.common import logging_output
    from jam_metaseq.hosts.fairseq import CM3Criterion, JamLanguageModel, dictionary_from_manifest
    from jam_metaseq.objectives.loss import cm3_loss

    register_hosts(import_hosts=True)
    task = argparse.Namespace(vocab=VOCAB, target_dictionary=dictionary_from_manifest(VOCAB))
    torch.manual_seed(0)
    model = JamLanguageModel.build_model(_filled("jam_uniform_tiny"), task)
    g = torch.Generator().manual_seed(1)
    samples = []
    for i, n in enumerate((9, 5)):
        tokens = torch.randint(4, VOCAB.size, (n + 1,), generator=g)
        tokens[3] = VOCAB.sentinel(0)  # a sentinel target the weight applies to
        samples.append({"id": i, "source": tokens[:-1], "target": tokens[1:],
                        "weights": (torch.arange(n) % 3 != 0).float()})
    batch = collate(samples, pad=VOCAB.pad)
    crit = CM3Criterion(task, sentinel_weight=0.25)
    loss, sample_size, log = crit(model, batch)
    ref = cm3_loss(model(**batch["net_input"])[0], batch["target"], vocab=VOCAB,
                   loss_mask=batch["loss_weights"], sentinel_weight=0.25, padding_idx=VOCAB.pad)
    assert torch.equal(loss, ref.loss) and torch.equal(sample_size, ref.weight_sum)
    assert log.keys() == logging_output(ref, batch).keys()
    for k, v in logging_output(ref, batch).items():
        assert torch.equal(torch.as_tensor(log[k]), torch.as_tensor(v)), k
    assert 0 < float(sample_size) < float(ref.ntokens)  # weights < 1 did reach the loss


# ---- registration happens when the package is imported with a host there (--user-dir) ------------
def test_importing_the_library_first_changes_no_host():
    """Importing jam_metaseq, its models and the checkpoint tools from a notebook or a tool, before
    any host, imports no host and patches nothing: no import hook, fairseq's registries,
    checkpoint_utils and broadcast as shipped once fairseq is imported afterwards."""
    pytest.importorskip("fairseq")
    root = str(Path(USER_DIR).parent)
    assert "UNTOUCHED" in fresh_interpreter(library_leaves_host_alone("fairseq"), pythonpath=root, cwd=root).stdout


def test_importing_the_package_after_fairseq_registers_with_it():
    """The package's import is the --user-dir entry point: with fairseq imported, it registers the
    archs, task and criterion and installs the shims, once; the rest of the library adds nothing."""
    pytest.importorskip("fairseq")
    root = str(Path(USER_DIR).parent)
    assert "REGISTERED" in fresh_interpreter(library_after_host_registers("fairseq"), pythonpath=root,
                                             cwd=root).stdout


@pytest.mark.parametrize("route", ["checkout", "installed"])
def test_fairseq_user_dir_registers(tmp_path, route):
    """``--user-dir`` pointing at the checkout's package or at an installed copy registers the
    archs, task and criterion with fairseq, and installs the checkpoint shims."""
    pytest.importorskip("fairseq")
    if route == "installed":
        site = installed_copy(tmp_path)
        user_dir, pythonpath = str(site / "jam_metaseq"), str(site)
    else:
        user_dir, pythonpath = USER_DIR, str(Path(USER_DIR).parent)
    res = fresh_interpreter(user_dir_registers("fairseq", user_dir, str(tmp_path)), pythonpath=pythonpath, cwd=str(tmp_path))
    assert "ARCH jam_cross_tiny 0 32 True" in res.stdout and "SHIMS True" in res.stdout
    assert f"FROM {user_dir}/__init__.py" in res.stdout


def test_core_import_does_not_import_a_host():
    res = subprocess.run([sys.executable, "-c", "import sys; " + LIBRARY + "; import jam_metaseq.objectives.loss; "
                          "print(sorted(h for h in ('fairseq', 'metaseq') if h in sys.modules))"],
                         capture_output=True, text=True, cwd=str(Path(USER_DIR).parent))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"

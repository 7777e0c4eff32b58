"""jam-ckpt outputs load through fairseq's own checkpoint code, without the host adapter's fix-ups.

fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` -> ``_upgrade_state_dict`` indexes
``optimizer_history[-1]`` and ``extra_state["train_iterator"]`` unconditionally; the trainer then
reads ``num_updates`` and starts its data iterator at ``train_iterator["epoch"]``. Importing
fairseq after ``jam_metaseq`` makes the adapter wrap ``_upgrade_state_dict``
(``hosts.compat.patch_host_upgrader``); these tests put fairseq's original back, so they check
the files as written.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from checkpoints_tools.io import OutputSpec
from checkpoints_tools.io.host_meta import START_CRITERION
from checkpoints_tools.ops import CommonOptions, cross, merge
from jam_metaseq.vocab import tiny_manifest
from _ckpt_util import save_metaseq, tiny_parent

torch.set_num_threads(1)
checkpoint_utils = pytest.importorskip("fairseq.checkpoint_utils")


def _fairseq_original_upgrader():
    fn = checkpoint_utils._upgrade_state_dict
    while getattr(fn, "_jam_wrapped", False):  # the adapter's wrapper closes over the original
        fn = next(c.cell_contents for c in fn.__closure__ if callable(c.cell_contents))
    assert fn.__module__ == "fairseq.checkpoint_utils"
    return fn


@pytest.fixture
def plain_fairseq(monkeypatch):
    """fairseq's load path exactly as shipped: its own upgrader, torch's safe loading with only
    ``argparse.Namespace`` allowed (what a fairseq-written cfg needs)."""
    monkeypatch.setattr(checkpoint_utils, "_upgrade_state_dict", _fairseq_original_upgrader())
    with torch.serialization.safe_globals([argparse.Namespace]):
        yield checkpoint_utils


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostparents")
    cfg, a = tiny_parent(21)
    _, b = tiny_parent(22)
    vocab = tiny_manifest(text_size=60, image_codes=56)
    vocab.save(d / "vocab.json")
    return save_metaseq(d / "llm", cfg, a), save_metaseq(d / "img", cfg, b, mp=2), d / "vocab.json"


def _check_state(state) -> None:
    hist = state["optimizer_history"]
    assert len(hist) == 1 and hist[-1]["num_updates"] == 0
    assert hist[-1]["criterion_name"] == START_CRITERION
    assert state["last_optimizer_state"] is None  # the trainer never compares names then
    it = state["extra_state"]["train_iterator"]
    assert it["epoch"] == 1 and it["iterations_in_epoch"] == 0
    assert state["cfg"].model.model_parallel_size >= 1


def test_criterion_name_is_the_fairseq_hosts_class():
    fairseq_host = pytest.importorskip("jam_metaseq.hosts.fairseq")
    assert fairseq_host.CM3Criterion.__name__ == START_CRITERION


def test_merge_output_loads_with_fairseq_load_checkpoint_to_cpu(parents, tmp_path, plain_fairseq):
    llm, img, vocab = parents
    out = merge([llm, img], opts=CommonOptions(spec=OutputSpec(out_dir=tmp_path / "m"), vocab=str(vocab),
                                               progress=False, hash_sources=False))
    state = plain_fairseq.load_checkpoint_to_cpu(str(out / "checkpoint.pt"))
    _check_state(state)
    assert state["cfg"].model.arch == "jam_uniform"
    assert state["model"]["decoder.embed_tokens.weight"].shape[0] == 128


@pytest.mark.parametrize("fsdp", [0, 2])
def test_cross_mp_parts_load_with_fairseq(parents, tmp_path, plain_fairseq, fsdp):
    llm, img, vocab = parents
    out = cross(llm, img, opts=CommonOptions(spec=OutputSpec(out_dir=tmp_path / "x", mp=2, fsdp=fsdp),
                                             vocab=str(vocab), progress=False, hash_sources=False),
                cross_every=2)
    files = sorted(out.glob("*.pt"))
    assert len(files) == 2 * max(fsdp, 1)
    for f in files:
        state = plain_fairseq.load_checkpoint_to_cpu(str(f))
        _check_state(state)
        assert state["cfg"].model.arch == "jam_cross" and state["cfg"].common.model_parallel_size == 2
        if fsdp:
            assert "shard_metadata" in state


def test_original_upgrader_still_rejects_an_empty_history(plain_fairseq):
    """The failure this guards against: fairseq's upgrader on the old ``[]`` / ``None`` entries."""
    with pytest.raises((IndexError, TypeError)):
        plain_fairseq._upgrade_state_dict({"model": {}, "optimizer_history": [], "extra_state": None})


def test_reading_keeps_the_hosts_allowed_globals(parents):
    """A host allow-lists argparse.Namespace process-wide; our safe loader must not undo that
    (torch's ``safe_globals`` context removes its whole list on exit)."""
    from checkpoints_tools.readers import open_checkpoint

    llm, _, _ = parents
    with torch.serialization.safe_globals([argparse.Namespace]):
        open_checkpoint(llm)
        assert argparse.Namespace in torch.serialization.get_safe_globals()

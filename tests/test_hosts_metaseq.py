"""The metaseq adapter on a real metaseq install (JAM §3.1; ``reference/metaseq.md``).

metaseq is not on PyPI (the PyPI ``metaseq`` is an unrelated package) and cannot run in CI, so
these tests carry the ``metaseq`` marker (deselected by default) and skip cleanly without it.
Run on a machine with facebookresearch/metaseq installed: ``pytest -m metaseq tests/test_hosts_metaseq.py``.
"""

from __future__ import annotations

import argparse
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.metaseq


def _real_metaseq():
    if importlib.util.find_spec("metaseq") is None or importlib.util.find_spec("metaseq.models") is None:
        pytest.skip("facebookresearch/metaseq is not installed")
    import metaseq  # noqa: F401


def test_registers_archs_task_criterion_once():
    _real_metaseq()
    from jam_metaseq.hosts import register_hosts
    from metaseq.criterions import CRITERION_REGISTRY
    from metaseq.models import ARCH_MODEL_REGISTRY
    from metaseq.tasks import TASK_REGISTRY

    assert "metaseq" in register_hosts()
    register_hosts()  # idempotent: metaseq's registries raise on duplicates
    assert {"jam_uniform_7b", "jam_width_7b", "jam_cross_7b", "jam_cross_tiny"} <= set(ARCH_MODEL_REGISTRY)
    assert "cm3_multimodal" in TASK_REGISTRY and "cm3" in CRITERION_REGISTRY


def test_metaseq_model_keys_and_logits_match_the_core(tmp_path):
    _real_metaseq()
    from _hosts_util import VOCAB, fused_checkpoint
    from jam_metaseq.hosts import args as jam_args
    from jam_metaseq.hosts.metaseq import JamMetaseqModel, dictionary_from_manifest

    p = argparse.ArgumentParser()
    jam_args.add_model_args(p)
    ns = p.parse_args([])
    jam_args.apply_arch_defaults(ns, family="jam_cross", size="tiny")
    ns.cross_every = 1
    assert ns.decoder_learned_pos and ns.share_decoder_input_output_embed

    class _Task:
        vocab = VOCAB
        target_dictionary = dictionary_from_manifest(VOCAB)

        def on_model_built(self, model, args):
            pass

    model = JamMetaseqModel.build_model(ns, _Task())
    core = model.decoder.core
    assert list(model.state_dict()) == list(core.state_dict())
    start = torch.load(fused_checkpoint("jam_cross", tmp_path, cross_every=1, use_cli=False), weights_only=False)
    model.load_state_dict(start["model"], strict=True)
    model.eval()
    tokens = torch.randint(4, VOCAB.size, (2, 7))
    assert torch.equal(model(tokens)[0], core(tokens))

"""The key schema (``jam_metaseq.models.keys``): every model's keys, their model-parallel rules and
fresh init, and the checkpoint bytes that follow from them, against references written before it.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import _schema_golden as golden
from jam_metaseq.models import build_model, keys
from jam_metaseq.models.config import cross_of, preset, uniform_of, width_of

torch.set_num_threads(1)


def _cfg(arch: str, *, layers: int, bias: bool, affine_ln: bool, cross_every: int = 1, init: str = "paper",
         family: str = "tiny"):
    parent = preset(family, layers=layers, bias=bias, affine_ln=affine_ln)
    if arch == "decoder":
        return parent
    if arch == "uniform":
        return uniform_of(parent)
    if arch == "width":
        return width_of(parent)
    return cross_of(parent, cross_every, cross_init=init, image_vocab_start=64, image_vocab_end=100)


configs = st.builds(_cfg, st.sampled_from(["decoder", "uniform", "width", "cross"]), layers=st.integers(1, 4),
                    bias=st.booleans(), affine_ln=st.booleans(), cross_every=st.integers(0, 4),
                    init=st.sampled_from(["paper", "preserve"]),
                    family=st.sampled_from(["tiny", "llama_tiny", "qwen2_tiny", "gemma_tiny", "chameleon_tiny"]))


@settings(max_examples=40, deadline=None)
@given(cfg=configs)
def test_schema_names_every_tensor_of_every_model_in_order(cfg):
    with torch.device("meta"):
        model = build_model(cfg)
    assert keys.state_keys(cfg) == list(model.state_dict())
    expanded = {t.format(i=i) for t, _ in keys.templates(cfg) for i in range(8)}
    assert set(model.state_dict()) <= expanded
    assert not {k for k in expanded - set(model.state_dict()) if "{i}" not in k and keys.block_of(k) is None}
    for template, rule in keys.templates(cfg):
        assert rule in keys.RULES and keys.rule_for(template.format(i=0)) == rule, template


# The split plan as checkpoints_tools/layout.py wrote it before the schema (main 40262bc): the
# reference the schema's rules must reproduce for every key, including keys no model has.
_L = r"decoder\.(?:layers|layers_llm|layers_cm3|x_attn_layers_llm|x_attn_layers_cm3)\.\d+\."
_RECORDED_RULES = [(re.compile(p + r"$"), r) for p, r in [
    (r"decoder\.embed_tokens\.weight", "vocab"),
    (r"decoder\.output_projection\.weight", "vocab"),
    (_L + r"self_attn\.qkv_proj\.(?:weight|bias)", "qkv"),
    (_L + r"(?:self_attn|cross_attn)\.(?:q_proj|k_proj|v_proj)\.(?:weight|bias)", "column"),
    (_L + r"(?:self_attn|cross_attn)\.out_proj\.weight", "row"),
    (_L + r"fc1\.(?:weight|bias)", "column"),
    (_L + r"fc2\.weight", "row"),
    # Added after the recording with asymmetric JAM-Cross (issue 17): its per-branch input
    # embeddings are vocab-parallel like the shared one. No key recorded above changes.
    (r"decoder\.embed_tokens_(?:llm|cm3)\.weight", "vocab"),
    # Chameleon's per-head q/k norms (issue 24): split by heads, with the q/k projections' rows.
    (_L + r"self_attn\.(?:q_norm|k_norm)\.(?:weight|bias)", "column"),
]]


def _recorded_rule(key: str) -> str:
    return next((r for p, r in _RECORDED_RULES if p.match(key)), "replicated")


def _any_keys() -> list[str]:
    locals_ = [f"{m}.{p}" for m in ("self_attn.qkv_proj", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                      "self_attn.out_proj", "self_attn.q_norm", "self_attn.k_norm", "cross_attn.q_proj", "cross_attn.k_proj",
                                      "cross_attn.v_proj", "cross_attn.out_proj", "cross_attn.qkv_proj", "fc1", "fc2",
                                      "fc3", "self_attn_layer_norm", "cross_attn_layer_norm", "final_layer_norm",
                                      "layer_norm")
               for p in ("weight", "bias")]
    out = [f"{c}.{i}.{n}" for c in keys.CONTAINERS + ("decoder.blocks", "layers") for i in (0, 7, 31) for n in locals_]
    out += list(keys.TOP) + ["decoder.embed_tokens.bias", "model.decoder.embed_tokens.weight", "lm_head.weight",
                             "decoder.layers.x.fc1.weight", "decoder.layers.1.fc1.weight.extra", ""]
    return out


def test_rules_equal_the_split_plan_recorded_before_the_schema():
    checked = _any_keys()
    for arch in ("decoder", "width", "cross"):
        checked += keys.state_keys(_cfg(arch, layers=3, bias=True, affine_ln=True))
    wrong = {k: (keys.rule_for(k), _recorded_rule(k)) for k in checked if keys.rule_for(k) != _recorded_rule(k)}
    assert not wrong
    assert {keys.rule_for(k) for k in checked} == set(keys.RULES)  # every rule was exercised


@settings(max_examples=20, deadline=None)
@given(cfg=configs, seed=st.integers(0, 2**31 - 1))
def test_fresh_model_follows_the_init_rule_in_parameter_order(cfg, seed):
    """A built model = the init written here from the paper (§2.1.3) and metaseq's init, drawn
    after what PyTorch's layers draw when they are constructed: one N(0, init_std) draw per
    matrix/embedding from the global generator, in ``named_parameters`` order; biases 0,
    LayerNorm weights 1; JAM-Cross ``preserve`` then zeroes each cross block's out_proj and fc2
    and sets the feature projection to [I/2, I/2]."""
    from unittest import mock

    torch.manual_seed(seed)
    model = build_model(cfg)
    p = getattr(cfg, "parent", cfg)
    torch.manual_seed(seed)
    with mock.patch("jam_metaseq.models.decoder.init_parameters_"), mock.patch("jam_metaseq.models.cross.init_parameters_"):
        ref = build_model(cfg)  # PyTorch's construction-time draws only
    want = {}
    for name, t in ref.named_parameters():
        if name.endswith("bias"):
            want[name] = torch.zeros(t.shape)
        elif name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):  # Chameleon: LayerNorms
            want[name] = torch.ones(t.shape)
        elif "layer_norm" in name:  # Gemma's norms scale by 1 + w: w starts at 0 (HF's init)
            want[name] = torch.zeros(t.shape) if p.norm == "rmsnorm_plus_one" else torch.ones(t.shape)
        else:
            want[name] = torch.empty(t.shape).normal_(0.0, p.init_std)
        if getattr(cfg, "cross_init", None) == "preserve":
            if name.startswith("decoder.x_attn_layers_") and (".out_proj." in name or ".fc2." in name):
                want[name] = torch.zeros(t.shape)
            elif name == "decoder.feature_projection.weight":
                eye = torch.eye(p.embed_dim) / 2
                want[name] = torch.cat([eye, eye], dim=1)
    got = dict(model.named_parameters())
    assert list(got) == list(want)
    for name, t in want.items():
        assert torch.equal(got[name].detach(), t), name
    tied = getattr(cfg, "tied_output", p.tie_embeddings)
    assert (model.decoder.output_projection.weight is model.decoder.embed_tokens.weight) == tied
    assert float(model.decoder.version) == 3.0


@settings(max_examples=20, deadline=None)
@given(cfg=configs, seed=st.integers(0, 2**31 - 1))
def test_fresh_parameters_of_a_meta_model_are_build_models(cfg, seed):
    """One tensor at a time from a model on the meta device (the metaseq host's tensor-parallel
    build) = ``build_model`` under the same seed, bitwise, and the generator ends in the same state."""
    from jam_metaseq.models import fresh_parameters

    torch.manual_seed(seed)
    want = build_model(cfg)
    after = torch.rand(4)
    torch.manual_seed(seed)
    with torch.device("meta"):
        meta = build_model(cfg)
    got = list(fresh_parameters(meta, cfg))
    assert [k for k, _ in got] == [k for k, _ in want.named_parameters()]
    for (k, v), p in zip(got, want.parameters()):
        assert v.device.type == "cpu" and torch.equal(v, p.detach()), k
    assert torch.equal(torch.rand(4), after)
    assert all(p.is_meta for p in meta.parameters())  # the meta model keeps no values


def test_cross_helpers():
    cfg = _cfg("cross", layers=2, bias=True, affine_ln=True)
    ks = keys.state_keys(cfg)
    assert keys.branch_source("decoder.layers_cm3.1.fc1.weight") == ("img", "decoder.layers.1.fc1.weight")
    assert keys.branch_source(keys.BRANCH_POSITIONS["llm"]) == ("llm", keys.POSITIONS)
    assert keys.branch_source(keys.EMBED) is None
    new = [k for k in ks if keys.is_cross_new(k)]
    assert new and all(k.startswith("decoder.x_attn_layers_") or k == keys.FEATURE_PROJECTION for k in new)
    assert keys.block_indices(ks, keys.CROSS_LAYERS["img"]) == {0, 1}
    assert keys.block_of("decoder.x_attn_layers_llm.1.fc2.bias") == ("decoder.x_attn_layers_llm", 1, "fc2.bias")
    assert keys.block_of("decoder.layer_norm.weight") is None


def test_fsdp_units_are_the_schema_blocks():
    from checkpoints_tools.io.fsdp import fsdp_unit

    assert fsdp_unit("decoder.x_attn_layers_cm3.12.cross_attn.q_proj.weight") == \
        ("decoder.x_attn_layers_cm3.12", "cross_attn.q_proj.weight")
    assert fsdp_unit("decoder.layers.3.self_attn.qkv_proj.bias") == ("decoder.layers.3", "self_attn.qkv_proj.bias")
    assert fsdp_unit("decoder.feature_projection.weight") == ("", "decoder.feature_projection.weight")


def test_model_namespace_is_the_hosts_flags():
    """``cfg["model"]`` of a written checkpoint rebuilds the model through the host flags."""
    import argparse

    from checkpoints_tools.io.host_meta import model_namespace
    from jam_metaseq import flags as jam_flags

    for arch in ("decoder", "uniform", "width", "cross"):
        cfg = _cfg(arch, layers=2, bias=arch != "width", affine_ln=True, cross_every=2, init="preserve")
        ns = model_namespace(cfg, model_parallel_size=2)
        assert ns.arch == ("transformer_lm" if arch == "decoder" else f"jam_{arch}") and ns.model_parallel_size == 2
        assert (ns.jam_family is None) == (arch == "decoder")
        flags = argparse.Namespace(**{**vars(ns), "jam_config": None, "jam_family": ns.jam_family or "jam_uniform"})
        back = jam_flags.config_from_args(flags, vocab_size=cfg.vocab_size, image_range=(64, 100))
        want = uniform_of(cfg) if arch == "decoder" else cfg
        assert back.to_dict() == want.to_dict()


# ---- checkpoint bytes recorded before the schema (tests/data/schema_golden.json) -----------------
_GOLDEN = json.loads(golden.DATA.read_text())


@pytest.fixture(scope="module")
def golden_parents(tmp_path_factory):
    return golden.make_parents(tmp_path_factory.mktemp("schema_golden"))


@pytest.mark.parametrize("case", sorted(_GOLDEN["cases"]))
def test_jam_ckpt_outputs_equal_the_recorded_digests(tmp_path, golden_parents, case):
    """merge / widen / cross (paper, preserve) x MP 1, MP 2, MP 2 + FSDP 2, and two reshards write
    the files whose sha256s were recorded before the key schema (``tests/_schema_golden.py``). A
    JAM-Cross case's drawn tensors depend on the CPU's ``torch.randn`` kernel: its files are
    compared where that kernel's fingerprint was recorded (AVX2 and DEFAULT dispatch), its other
    tensors always."""
    want = _GOLDEN["cases"][case]
    if "->" in case:
        op = golden.RESHARDS[case][0]
        out = golden.run_reshard(case, *golden_parents, tmp_path)
    else:
        op, lay = case.split("/")
        out = golden.run_case(op, lay, *golden_parents, tmp_path / "out")
    got = golden.digest_output(out, op)
    if "drawn" in want:
        assert got["fixed_tensors"] == want["fixed_tensors"], f"{case}: the tensors that are not drawn changed"
        fp, rec = next(iter(got.pop("drawn").items()))
        if fp not in want["drawn"]:
            pytest.xfail(f"{case}: this CPU's torch.randn kernel ({fp[:12]}) was not recorded; only the tensors "
                         "that are not drawn were compared (they match)")
        assert rec == want["drawn"][fp], case
    else:
        assert got == want, case

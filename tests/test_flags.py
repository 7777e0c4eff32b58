"""The flag table (jam_metaseq/flags.py; issue 22 item 2): each model flag once, every map between
flags and configs derived from it, host-free."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from jam_metaseq import flags
from jam_metaseq.models.config import (
    CrossConfig, DecoderConfig, cross_of, parent_of_width, preset, uniform_of, width_of,
)

PARENT = preset("tiny", vocab_size=100, bias=False, activation="gelu", scale_embedding=False, dropout=0.1)
SMALL_IMG = dataclasses.replace(PARENT, embed_dim=16, ffn_dim=48, layers=3, heads=2)
CONFIGS = {
    "decoder": PARENT,
    "uniform": uniform_of(PARENT),
    "width": width_of(PARENT),
    "cross": cross_of(PARENT, 1, cross_init="preserve", image_vocab_start=40, image_vocab_end=90),
    "cross_asym": cross_of(PARENT, 2, image_vocab_start=40, image_vocab_end=90, image_parent=SMALL_IMG),
    # the Llama family (issue 23): every family field through its own flag
    "llama_width": width_of(preset("llama_tiny", vocab_size=100, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "qwen2_uniform": uniform_of(preset("qwen2_tiny", vocab_size=100)),
    "gemma_cross_asym": cross_of(preset("gemma_tiny", vocab_size=100), 1, image_vocab_start=40, image_vocab_end=90,
                                 image_parent=preset("gemma_tiny", vocab_size=100, embed_dim=16, heads=2,
                                                     attn_head_dim=8, layers=3)),
}
FAMILY = ("llama_width", "qwen2_uniform", "gemma_cross_asym")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    flags.add_model_args(p)
    return p


def test_each_flag_once_and_each_field_exists():
    dests = [f.dest for f in flags.MODEL_FLAGS]
    assert len(dests) == len(set(dests))
    decoder_fields = {f.name for f in dataclasses.fields(DecoderConfig)}
    cross_fields = {f.name for f in dataclasses.fields(CrossConfig)}
    for f in flags.MODEL_FLAGS:
        if f.scope in ("parent", "image"):
            assert f.field in decoder_fields, f
        elif f.scope == "cross":
            assert f.field in cross_fields, f
        assert f.echo or not f.cli or f.help, f  # every flag on the command line explains itself
    # the parser defines exactly the table's command-line rows, once each
    options = [a.option_strings[0] for a in _parser()._actions]
    assert options == [f.option for f in flags.MODEL_FLAGS if f.cli and not f.echo]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_command_line_rebuilds_the_config(name):
    """A training command's model flags, parsed by the hosts' parser and filled by the sized
    arch's function (a switch not given is the preset's), give back the config."""
    from jam_metaseq.hosts.args import apply_arch_defaults

    cfg = CONFIGS[name]
    words = flags.command_line_from_config(cfg)
    opts = [w for w in words if w.startswith("--")]
    assert len(opts) == len(set(opts))
    ns = _parser().parse_args(words)
    apply_arch_defaults(ns, family=flags.args_from_config(cfg)["jam_family"], size="tiny")
    back = flags.config_from_args(ns, vocab_size=100, image_range=(40, 90), padding_idx=cfg.padding_idx)
    want = uniform_of(cfg) if name == "decoder" else cfg
    assert back.to_dict() == want.to_dict()
    assert any(w.startswith("--img-") for w in words) == name.endswith("cross_asym")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_saved_fields_infer_the_config_from_saved_args(name):
    """What a checkpoint stores (``args_from_config``'s dict) gives every field back by scope:
    the parent's, the cross settings, the image branch's when it differs."""
    cfg = CONFIGS[name]
    saved = flags.args_from_config(cfg)
    parent = cfg.parent if isinstance(cfg, CrossConfig) else (
        parent_of_width(cfg) if "width" in name else cfg)
    got = flags.saved_fields(saved, "parent")
    assert got == {f: getattr(parent, f) for f in got}
    assert set(got) == {f.field for f in flags.rows("parent")
                        if not (f.when_set and getattr(parent, f.field) == flags.field_default(f.field))}
    if name not in FAMILY:  # an OPT config stores none of the family fields
        assert len(got) == len([f for f in flags.rows("parent") if not f.when_set])
    assert flags.saved_fields(argparse.Namespace(**saved), "parent") == got  # a Namespace reads the same
    cross = flags.saved_fields(saved, "cross")
    image = flags.saved_fields(saved, "image")
    if isinstance(cfg, CrossConfig):
        assert cross == {"cross_every": cfg.cross_every, "cross_init": cfg.cross_init,
                         "image_vocab_start": 40, "image_vocab_end": 90}
        img = {f: getattr(cfg.img, f) for f in ("embed_dim", "ffn_dim", "layers", "heads", "kv_heads", "attn_head_dim")
               if getattr(cfg.img, f) is not None}
        assert image == ({} if cfg.symmetric else img)
    else:
        assert cross == image == {}
    assert flags.FLAG_OF["parent"]["heads"] == "decoder_attention_heads"
    assert flags.FIELD_OF["no_scale_embedding"] == ("parent", "scale_embedding")
    assert flags.FIELD_OF["img_attention_heads"] == ("image", "heads")


def test_host_arch_and_negated_switches():
    assert [flags.host_arch(CONFIGS[n]) for n in ("decoder", "uniform", "width", "cross")] == [
        "transformer_lm", "jam_uniform", "jam_width", "jam_cross"]
    saved = flags.args_from_config(PARENT)
    assert saved["disable_bias"] is True and saved["no_scale_embedding"] is True
    assert saved["disable_affine_ln"] is False and saved["tokens_per_sample"] == PARENT.max_positions
    words = flags.command_line_from_config(PARENT)
    assert "--disable-bias" in words and "--disable-affine-ln" not in words and "--tokens-per-sample" not in words


def test_a_when_set_row_keeps_older_configs_bytes(monkeypatch):
    """A flag added for a new field (``when_set``) is stored and written only when the field is not
    at its default, so configs that do not use it give exactly the args they gave before."""
    before = {n: flags.args_from_config(c) for n, c in CONFIGS.items()}
    row = flags.Flag("attention_dropout_new", "attention_dropout", "parent", float, "a newer field", when_set=True)
    monkeypatch.setattr(flags, "MODEL_FLAGS", flags.MODEL_FLAGS + (row,))
    monkeypatch.setattr(flags, "FLAGS_BY_DEST", {**flags.FLAGS_BY_DEST, row.dest: row})
    assert {n: flags.args_from_config(c) for n, c in CONFIGS.items()} == before  # all at the default 0.0
    changed = dataclasses.replace(PARENT, attention_dropout=0.25)
    assert flags.args_from_config(changed)["attention_dropout_new"] == 0.25
    words = flags.command_line_from_config(changed)
    assert words[words.index("--attention-dropout-new") + 1] == "0.25"


def test_image_branch_heads_without_kv_heads_is_plain_multi_head():
    """--img-attention-heads without --img-kv-heads beside a grouped-query LLM (SmolLM2: 9 heads, 3
    k/v heads): the image branch is plain multi-head, not the LLM's 3 k/v heads (which do not divide
    4 heads); and a config with such a branch survives args_from_config -> config_from_args."""
    from jam_metaseq.flags import args_from_config, config_from_args
    from jam_metaseq.models.config import PRESETS, cross_of

    llm = dataclasses.replace(PRESETS["llama_tiny"], embed_dim=48, heads=6, kv_heads=3)
    img = dataclasses.replace(llm, embed_dim=32, heads=4, kv_heads=None, ffn_dim=48)
    cfg = cross_of(llm, 1, image_parent=img)
    ns = argparse.Namespace(**args_from_config(cfg))
    back = config_from_args(ns, vocab_size=cfg.vocab_size, padding_idx=cfg.padding_idx)
    assert back.img.num_kv_heads == 4 and back.llm.num_kv_heads == 3
    assert back == cfg

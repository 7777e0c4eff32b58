"""The jam-ckpt CLI: every subcommand end to end on tiny parents, exit codes and one-line errors."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from checkpoints_tools.cli import build_parser, main
from jam_metaseq.vocab import tiny_manifest
from _ckpt_util import save_metaseq, tiny_parent

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def two_parents(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    cfg, a = tiny_parent(11)
    _, b = tiny_parent(12)
    vocab = tiny_manifest(text_size=60, image_codes=56)
    vocab.save(d / "vocab.json")
    return d, save_metaseq(d / "llm", cfg, a, mp=2), save_metaseq(d / "img", cfg, b), d / "vocab.json"


def test_every_flag_is_documented():
    ap = build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"inspect", "merge", "widen", "cross", "reshard", "convert", "transplant", "tokenizer",
                                "verify"}
    for name, p in sub.choices.items():
        for act in p._actions:
            if not isinstance(act, argparse._HelpAction):
                assert act.help, f"{name} {act.option_strings or act.dest} has no help"


def test_inspect_table_and_json(two_parents, capsys):
    _, llm, _, _ = two_parents
    assert main(["inspect", str(llm)]) == 0
    out = capsys.readouterr().out
    assert "MP=2" in out and "heads=4" in out
    assert main(["inspect", str(llm), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mp"] == 2 and info["parameters"] > 0 and info["config"]["embed_dim"] == 32


def test_cross_then_verify_then_corruption(two_parents, tmp_path, capsys):
    _, llm, img, vocab = two_parents
    out = tmp_path / "x"
    rc = main(["cross", "--llm", str(llm), "--img", str(img), "--cross-every", "2", "--vocab", str(vocab),
               "--mp", "2", "--dtype", "bf16", "-o", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "vocab.json").read_text())["text_size"] == 60
    m = json.loads((out / "manifest.json").read_text())
    assert m["operation"] == "cross" and m["command"][:2] == ["jam-ckpt", "cross"]
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["files_checked"] == 3 and rep["forward"]["tokens"] == [2, 8]
    f = out / "checkpoint-model_part-1.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "sha256" in err and "checkpoint-model_part-1.pt" in err


def test_vocab_that_does_not_fit_is_a_one_line_error(two_parents, tmp_path, capsys):
    d, llm, img, _ = two_parents
    small = tiny_manifest(text_size=8, image_codes=8)
    small.save(tmp_path / "small.json")
    rc = main(["merge", str(llm), str(img), "--vocab", str(tmp_path / "small.json"), "-o", str(tmp_path / "m")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "small.json" in err and "128 rows" in err
    assert not (tmp_path / "m").exists()


def test_widen_reshard_convert(two_parents, tmp_path, capsys):
    _, llm, img, _ = two_parents
    w = tmp_path / "w"
    assert main(["widen", "--llm", str(llm), "--img", str(img), "--init", "average", "--fsdp", "2",
                 "-o", str(w), "--quiet"]) == 0
    r = tmp_path / "r"
    assert main(["reshard", str(w), "--mp", "4", "-o", str(r), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(r), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "jam_width" and info["mp"] == 4 and info["config"]["embed_dim"] == 64
    # tiny presets scale embeddings, which HF OPT cannot express: refused with the reason
    assert main(["convert", str(r), "--to", "hf", "-o", str(tmp_path / "hf")]) == 2
    assert "scale" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()

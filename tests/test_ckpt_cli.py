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
    assert set(sub.choices) == {"inspect", "merge", "widen", "cross", "reshard", "convert", "transplant", "extend-vocab",
                                "tokenizer", "verify"}
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


# ---- extend-vocab (issue 25: the rows of the conversation tokens) ---------------------------------
def _logits(path, tokens):
    from checkpoints_tools.load import load_model

    model, _, vocab = load_model(path)
    with torch.no_grad():
        return model.eval()(tokens), vocab, model


def test_extend_vocab_keeps_every_old_id_and_starts_new_rows_at_the_text_mean(two_parents, tmp_path, capsys):
    """The LLM parent (2 model-parallel parts, no stored manifest) extended by the CLI: the same
    tensors as ``vocab_rows.extend_state_dict`` on the parent's state (the independent reference),
    the same function on every old id, a tied projection still tied, the rows in the manifest;
    then a JAM-Cross output (its manifest stored) extended with --conversation-tokens into
    safetensors, unchanged on old ids too."""
    from checkpoints_tools.load import load_model
    from checkpoints_tools.readers import open_checkpoint
    from jam_metaseq.vocab import VocabManifest
    from jam_metaseq.vocab_rows import extend_state_dict

    d, llm, img, vocab_path = two_parents
    old = VocabManifest.load(vocab_path)
    new = old.with_conversation_tokens()
    new.save(tmp_path / "new.json")
    out = tmp_path / "chat"
    assert main(["extend-vocab", str(llm), "--old-vocab", str(vocab_path), "--vocab", str(tmp_path / "new.json"),
                 "--mp", "2", "-o", str(out), "--quiet"]) == 0, capsys.readouterr().err
    src = open_checkpoint(llm)
    want = extend_state_dict(dict(src.items()), old=old, new=new)
    got = open_checkpoint(out)
    assert got.shapes()["decoder.embed_tokens.weight"] == (new.size, 32) and new.size == old.size + 8
    for name, t in want.items():
        assert torch.equal(got.get(name), t), name
    assert got.tied("decoder.embed_tokens.weight", "decoder.output_projection.weight")
    m = json.loads((out / "manifest.json").read_text())
    assert m["operation"] == "extend-vocab" and m["vocab_rows"]["rows"] == [old.num_used, new.size]
    assert m["vocab_rows"]["tokens"]["<eot>"] == new.eot and m["parameters"]["init"] == "text_mean"
    tokens = torch.randint(old.text_start, old.text_end, (2, 7))
    ref, _, _ = load_model(llm, vocab=str(vocab_path))
    b, v, _ = _logits(out, tokens)
    with torch.no_grad():
        a = ref.eval()(tokens)
    assert v == new
    torch.testing.assert_close(b[..., :old.num_used], a[..., :old.num_used])
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    # a JAM-Cross output carries its manifest: --conversation-tokens adds the three tokens to it
    x = tmp_path / "x"
    assert main(["cross", "--llm", str(llm), "--img", str(img), "--vocab", str(vocab_path), "-o", str(x),
                 "--quiet"]) == 0
    xc = tmp_path / "xc"
    assert main(["extend-vocab", str(x), "--conversation-tokens", "--format", "safetensors", "-o", str(xc),
                 "--quiet"]) == 0, capsys.readouterr().err
    a, _, _ = _logits(x, tokens)
    b, v, model = _logits(xc, tokens)
    assert v == new and model.cfg.vocab_size == new.size and model.cfg.image_vocab_end == old.image_end
    torch.testing.assert_close(b[..., :old.num_used], a[..., :old.num_used])


def test_extend_vocab_refusals_are_one_line(two_parents, tmp_path, capsys):
    d, llm, _, vocab_path = two_parents
    cases = [
        (["--old-vocab", str(vocab_path)], "--vocab NEW.json or --conversation-tokens"),
        (["--conversation-tokens"], "no vocabulary manifest"),
        (["--old-vocab", str(vocab_path), "--vocab", str(tmp_path / "moved.json")], "does not extend"),
        (["--old-vocab", str(tmp_path / "new.json"), "--conversation-tokens"], "nothing to add"),
    ]
    tiny_manifest(text_size=59, image_codes=56).with_conversation_tokens().save(tmp_path / "moved.json")
    tiny_manifest(text_size=56, image_codes=56, conversation_tokens=True).save(tmp_path / "new.json")  # 128 ids
    for flags, msg in cases:
        assert main(["extend-vocab", str(llm), *flags, "-o", str(tmp_path / "o"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and msg in err, err
        assert not (tmp_path / "o").exists()

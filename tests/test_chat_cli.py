"""``jam chat`` in the terminal (issue 25 item 3): turns typed on stdin stream back, pictures are
saved as PNG files with their paths printed, /image sends one, /new starts over; a model without
conversation tokens is refused in one line. Its model and decoding flags, and ``jam serve``'s, are
``jam-generate``'s rows of one table."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from _chat_util import write_chat_checkpoint
from _generation_util import one_thread  # noqa: F401  (tiny models: one thread)
from jam_metaseq.cli import main as jam_main
from jam_metaseq.models import build_model, preset
from jam_metaseq.vocab import tiny_manifest


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_chat_checkpoint(tmp_path_factory.mktemp("chat") / "model")


def test_chat_streams_turns_and_saves_pictures(model_dir, tmp_path, monkeypatch, capsys):
    Image.new("RGB", (32, 32), (20, 60, 220)).save(tmp_path / "blue.png")
    lines = ["draw a red circle", f"/image {tmp_path / 'blue.png'} like this one?", "/image", "/new", "hello", "/quit"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    rc = jam_main(["chat", str(model_dir["checkpoint"]), "--image-tokenizer", str(model_dir["vq"]),
                   "--min-images", "1", "--max-new-tokens", "70", "--out", str(tmp_path / "pics")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    saved = re.findall(r"\[picture: (\S+\.png)\]", out.out)
    assert [Path(p).name for p in saved] == ["chat1-turn1-image1.png", "chat1-turn2-image1.png",
                                            "chat2-turn1-image1.png"]
    for p in saved:
        assert Image.open(p).size == (32, 32)
    assert "[usage: /image PATH [text]]" in out.out and "[new conversation]" in out.out
    assert out.out.count("jam> ") == 3
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", out.out)  # no control characters reach the terminal


def test_chat_refuses_a_model_without_conversation_tokens(tmp_path, capsys):
    vocab = tiny_manifest(text_size=256)
    cfg = preset("tiny", vocab_size=vocab.size)
    torch.save({"model": build_model(cfg).state_dict(), "jam_config": cfg.to_dict(), "jam_vocab": vocab.to_dict()},
               tmp_path / "ckpt.pt")
    rc = jam_main(["chat", str(tmp_path / "ckpt.pt"), "--tokenizer", "bytes"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no conversation tokens" in err[0] and "ckpt.pt" in err[0]


def test_one_table_of_decoding_flags():
    """``jam-generate``, ``jam chat`` and ``jam serve`` take their model and decoding flags from
    ``generation.options.OPTIONS``: each flag declared once, offered by the commands its row names,
    with one default; the same flags give the same ``GenerationConfig`` in every command."""
    from jam_metaseq.generation import options
    from jam_metaseq.generation.chat_cli import build_parser as chat_parser
    from jam_metaseq.generation.cli import build_parser as generate_parser
    from jam_metaseq.serve.cli import build_parser as serve_parser

    table = {o.option: o for o in options.OPTIONS}
    assert len(table) == len(options.OPTIONS)

    def flags(parser):
        return {s: a for a in parser._actions for s in a.option_strings if s.startswith("--")}

    parsers = {"generate": flags(generate_parser()), "chat": flags(chat_parser()), "serve": flags(serve_parser())}
    for name, row in table.items():
        for command, found in parsers.items():
            tool = "generate" if command == "generate" else "chat"
            assert (name in found) == (tool in row.tools), (command, name)
            if name in found:
                want = row.kwargs.get("default", False if row.kwargs.get("action") == "store_true" else None)
                assert found[name].default == want and found[name].help, (command, name)
    # what each command adds is its own: no decoding flag outside the table
    assert set(parsers["chat"]) - set(table) == {"--help", "--trust-pickle", "--out"}
    assert set(parsers["serve"]) - set(table) == {"--help", "--trust-pickle", "--host", "--port", "--max-conversations",
                                                  "--max-generating", "--max-upload-mb"}
    argv = ["--temperature", "0.5", "--top-k", "3", "--repetition-penalty", "1.2", "--guidance-scale", "2",
            "--max-new-tokens", "9", "--seed", "4", "--min-images", "1"]
    a = generate_parser().parse_args(["--checkpoint", "x.pt", *argv])
    b = chat_parser().parse_args(["x.pt", *argv])
    assert options.generation_config(a) == options.generation_config(b)
    c = options.generation_config(b)
    assert (c.image.temperature, c.image.top_k, c.text.repetition_penalty, c.min_images) == (0.5, 3, 1.2, 1)

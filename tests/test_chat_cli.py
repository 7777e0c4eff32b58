"""``jam chat`` in the terminal (issue 25 item 3): turns typed on stdin stream back, pictures are
saved as PNG files with their paths printed, /image sends one, /new starts over; a model without
conversation tokens is refused in one line."""

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

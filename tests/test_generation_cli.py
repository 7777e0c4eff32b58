"""jam-generate end to end on a tiny checkpoint written to a temp dir; rendering to files."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from _generation_util import one_thread  # noqa: F401
from jam_metaseq.generation.answer import Answer, split_segments
from jam_metaseq.generation.cli import main
from jam_metaseq.generation.render import save_images, to_html, to_markdown
from jam_metaseq.models import build_model, preset
from jam_metaseq.vocab import tiny_manifest

VOCAB = tiny_manifest(text_size=256)  # room for the byte tokenizer



@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=VOCAB.size, max_positions=80, init_std=0.3)
    model = build_model(cfg)
    torch.save(
        {"model": model.state_dict(), "jam_config": cfg.to_dict(), "jam_vocab": VOCAB.to_dict()},
        d / "checkpoint.pt",
    )
    return d / "checkpoint.pt"


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_prompt_to_json_lines(ckpt, capsys):
    rc, out, err = run(capsys, "--checkpoint", ckpt, "--tokenizer", "bytes", "--prompt", "How can I make shakshuka?",
                       "--prompt", "Cats?", "--max-new-tokens", "20", "--min-images", "1", "--no-progress")
    assert rc == 0, err
    answers = [Answer.from_dict(json.loads(line)) for line in out.splitlines()]
    assert [a.prompt for a in answers] == ["How can I make shakshuka?", "Cats?"]
    assert answers[0].prompt_ids[0] == VOCAB.eos  # document separator first
    assert answers[0].prompt_ids[1:] == [VOCAB.text_start + b for b in b"How can I make shakshuka?"]
    for a in answers:
        assert len(a.images) >= 1 and a.images[0].complete
        assert all(isinstance(s.text, str) for s in a.segments if s.to_dict()["type"] == "text")
    # Same flags, same answers, in every decode mode (graph falls back to static on CPU; auto = eager there).
    # The modes run steps of different shapes: tokens are compared in float64 (see _generation_util.float64).
    by_mode = {}
    for decode in ("eager", "auto", "static", "graph"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rc2, by_mode[decode], _ = run(capsys, "--checkpoint", ckpt, "--tokenizer", "bytes", "--prompt",
                                          "How can I make shakshuka?", "--prompt", "Cats?", "--max-new-tokens", "20",
                                          "--min-images", "1", "--no-progress", "--decode", decode, "--dtype", "float64")
        assert rc2 == 0 and by_mode[decode] == by_mode["eager"], decode
        assert any("needs a CUDA device" in str(w.message) for w in caught) == (decode == "graph")


def test_prompts_file_to_out_dir(ckpt, capsys, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red square", "seed": 4}) + "\n\n"
                       + json.dumps({"prompt_ids": [VOCAB.eos, VOCAB.text_start + 7]}) + "\n")
    out = tmp_path / "out"
    rc, _, err = run(capsys, "--checkpoint", ckpt, "--tokenizer", "bytes", "--prompts", prompts, "--out", out,
                     "--images", "force", "--max-new-tokens", "8", "--batch-size", "1")
    assert rc == 0, err
    lines = (out / "answers.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["seed"] == 4 and json.loads(lines[1])["seed"] == 1
    assert json.loads(lines[0])["ids"][0] == VOCAB.break_id  # --images force
    assert "## Answer 1: a red square" in (out / "answers.md").read_text()
    assert "<table class=\"grid\"" in (out / "answers.html").read_text()
    assert "image tokens" in err  # progress bar on stderr


def test_clear_errors(ckpt, capsys, tmp_path):
    other = tiny_manifest(text_size=300)
    other.save(tmp_path / "vocab.json")
    rc, _, err = run(capsys, "--checkpoint", ckpt, "--vocab", tmp_path / "vocab.json", "--tokenizer", "bytes",
                     "--prompt", "x", "--no-progress")
    assert rc == 2 and f"{other.size} ids" in err and f"{VOCAB.size} rows" in err
    rc, _, err = run(capsys, "--checkpoint", ckpt, "--tokenizer", "bytes", "--prompt", "x" * 100, "--no-progress")
    assert rc == 2 and "context holds 80" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    rc, _, err = run(capsys, "--checkpoint", ckpt, "--tokenizer", "bytes", "--prompts", bad)
    assert rc == 2 and f"{bad}:2" in err
    rc, _, err = run(capsys, "--checkpoint", tmp_path / "nope.pt", "--prompt", "x")
    assert rc == 2 and "nope.pt" in err
    rc, _, err = run(capsys, "--checkpoint", ckpt, "--prompt", "x", "--prompts", bad)
    assert rc == 2 and "not both" in err


def test_help_runs_as_a_module():
    r = subprocess.run([sys.executable, "-m", "jam_metaseq.generation.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--guidance-scale" in r.stdout and "Eq. 6" in r.stdout


class PaletteDecoder:
    """A stand-in VQ decoder with the image-tokenizer interface: each code is a fixed colour."""

    grid = VOCAB.image_grid

    def decode_codes(self, codes):
        codes = np.asarray(codes)
        palette = np.stack([np.arange(256) * 37 % 256, np.arange(256) * 91 % 256, np.arange(256) * 13 % 256], 1)
        return [Image.fromarray(palette[c].astype(np.uint8)).resize((16, 16), Image.NEAREST) for c in codes]


def test_save_images_writes_pngs_and_renderers_link_them(tmp_path):
    img = VOCAB.image_start
    ids = [VOCAB.text_start, VOCAB.break_id, img, img + 1, img + 2, img + 3, VOCAB.break_id, VOCAB.break_id, img + 9]
    a = Answer(prompt_ids=[VOCAB.eos], ids=ids, finish_reason="length", seed=0,
               segments=split_segments(ids, vocab=VOCAB), prompt="<b>bold</b>")
    save_images([a], image_decoder=PaletteDecoder(), out_dir=tmp_path)
    full, cut = a.images
    assert full.png == "images/answer0_image0.png" and cut.png is None  # incomplete images stay grids
    png = Image.open(tmp_path / full.png)
    assert png.size == (16, 16)
    expected = PaletteDecoder().decode_codes([[[0, 1], [2, 3]]])[0]
    assert png.convert("RGB").getpixel((15, 15)) == expected.getpixel((15, 15)) == (3 * 37, 3 * 91 % 256, 3 * 13)
    md, html = to_markdown([a]), to_html([a])
    assert "![image 2](images/answer0_image0.png)" in md and "(incomplete)" in md
    assert '<img src="images/answer0_image0.png"' in html and "&lt;b&gt;bold" in html and "<b>bold" not in html


def test_out_dir_with_a_real_image_tokenizer(capsys, tmp_path):
    """--image-tokenizer: the VQ decoder (random tiny VQGAN, 8x8 codes) turns each image into a PNG."""
    from jam_metaseq.image_tokenizer import VQGAN, ImageTokenizer
    from jam_metaseq.image_tokenizer import preset as vq_preset

    torch.manual_seed(0)
    vq = ImageTokenizer(VQGAN(vq_preset("tiny")))
    vq.save(tmp_path / "vq")
    vocab = tiny_manifest(text_size=256, image_codes=vq.n_codes, image_grid=vq.grid)
    cfg = preset("tiny", vocab_size=vocab.size, max_positions=160, init_std=0.3)
    torch.save({"model": build_model(cfg).state_dict(), "jam_config": cfg.to_dict()}, tmp_path / "ckpt.pt")
    vocab.save(tmp_path / "vocab.json")  # found beside the checkpoint
    rc, _, err = run(capsys, "--checkpoint", tmp_path / "ckpt.pt", "--tokenizer", "bytes", "--prompt", "a cat",
                     "--images", "force", "--max-new-tokens", 70, "--image-tokenizer", tmp_path / "vq",
                     "--out", tmp_path / "out", "--no-progress")
    assert rc == 0, err
    answer = json.loads((tmp_path / "out" / "answers.jsonl").read_text())
    png = answer["segments"][0]["png"]
    assert Image.open(tmp_path / "out" / png).size == (vq.resolution, vq.resolution)
    assert png in (tmp_path / "out" / "answers.html").read_text()
    # A manifest whose grid does not match the tokenizer is refused, naming both.
    tiny_manifest(text_size=256, image_codes=vq.n_codes, image_grid=(4, 16)).save(tmp_path / "v2.json")
    rc, _, err = run(capsys, "--checkpoint", tmp_path / "ckpt.pt", "--vocab", tmp_path / "v2.json",
                     "--tokenizer", "bytes", "--prompt", "a cat", "--image-tokenizer", tmp_path / "vq",
                     "--out", tmp_path / "out2", "--no-progress")
    assert rc == 2 and "(8, 8)" in err and "(4, 16)" in err


def test_a_model_with_conversation_tokens_answers_a_first_turn(tmp_path, capsys):
    """``--prompt-prefix auto``: a model whose manifest has the conversation tokens gets each prompt as
    a chat's first user turn (``Conversation``'s framing) and its answer ends at ``<eot>``; ``eos``
    keeps the document prefix; ``turn`` without the tokens is refused in one line."""
    from jam_metaseq.data.tokenizers import ByteTokenizer
    from jam_metaseq.generation.conversation import turn_prompt
    from jam_metaseq.generation.run import PromptSpec, encode_prompts

    vocab = tiny_manifest(text_size=256, conversation_tokens=True)
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=vocab.size, max_positions=80, init_std=0.3)
    torch.save({"model": build_model(cfg).state_dict(), "jam_config": cfg.to_dict(), "jam_vocab": vocab.to_dict()},
               tmp_path / "chat.pt")
    text = [vocab.text_start + b for b in b"hi"]
    ids = encode_prompts([PromptSpec(text="hi")], vocab=vocab, tokenizer=ByteTokenizer(), prefix="turn")
    assert ids == [[vocab.eos] + turn_prompt(text, vocab=vocab)]
    assert ids[0] == [vocab.eos, vocab.user_id, *text, vocab.eot, vocab.assistant_id]
    common = ["--checkpoint", tmp_path / "chat.pt", "--tokenizer", "bytes", "--prompt", "hi", "--no-progress"]
    rc, out, err = run(capsys, *common, "--max-new-tokens", "40")
    assert rc == 0, err
    a = json.loads(out.splitlines()[0])
    assert a["prompt_ids"] == ids[0]
    assert vocab.eot not in a["ids"][:-1] and (a["finish_reason"] == "eos") == (a["ids"][-1] == vocab.eot)
    rc, out, _ = run(capsys, *common, "--max-new-tokens", "5", "--prompt-prefix", "eos")
    assert rc == 0 and json.loads(out.splitlines()[0])["prompt_ids"] == [vocab.eos, *text]
    tiny_manifest(text_size=256).save(tmp_path / "plain.json")
    rc, _, err = run(capsys, *common, "--vocab", tmp_path / "plain.json", "--prompt-prefix", "turn")
    assert rc == 2 and "--prompt-prefix turn needs a vocabulary with conversation tokens" in err

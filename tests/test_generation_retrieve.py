"""jam-generate --retrieve: retrieved documents as the prompt's prefix (paper §3.1 retrieval augmentation).

A tiny memory bank (``jam-retrieval build`` with the random-weight ``jam-tiny-clip`` preset) and a
tiny checkpoint in a temp dir. The model input is checked against a prefix built independently from
the bank's token sequences, against runs given the same ids explicitly (conditional rows with
``--no-guidance``; the unconditional CFG row with guidance scale 0, where image codes come from it
alone; in float64, as the rows are batched differently in the two runs), and against the context
rule (prompt + prefix + max_new_tokens <= max_positions).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _generation_util import one_thread  # noqa: F401
from jam_metaseq.generation.cfg import unconditional_prompt
from jam_metaseq.generation.cli import main
from jam_metaseq.generation.run import RetrievalOptions, load_retriever
from jam_metaseq.models import build_model, preset
from jam_metaseq.retrieval.bank import MemoryBank
from jam_metaseq.retrieval.cli import main as retrieval_main
from jam_metaseq.vocab import tiny_manifest

VOCAB = tiny_manifest(text_size=256)  # room for the byte tokenizer
MAX_POSITIONS = 128
CAPTIONS = ["a red bicycle by the river", "a sleeping grey cat", "three boats at sunset",
            "snow on a mountain", "a bowl of green apples", "a red bicycle by the river",
            "children playing football", "an old stone bridge"]
PROMPT = "a red bicycle by the river"
RANDOM_CLIP = "ignore:no CLIP weights:UserWarning"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint path, bank dir): 8 caption + image-token documents, c0 and c5 share a caption."""
    d = tmp_path_factory.mktemp("gen_retrieve")
    VOCAB.save(d / "vocab.json")
    rng = np.random.default_rng(0)
    with open(d / "docs.jsonl", "w") as f:
        for i, c in enumerate(CAPTIONS):
            codes = rng.integers(0, VOCAB.image_codes, VOCAB.image_tokens_per_image).tolist()
            f.write(json.dumps({"id": f"c{i}", "segments": [{"text": c}, {"image_tokens": codes}]}) + "\n")
    assert retrieval_main(["build", str(d / "docs.jsonl"), "--out", str(d / "bank"), "--vocab",
                           str(d / "vocab.json"), "--tokenizer", "bytes", "--clip-model", "jam-tiny-clip",
                           "--random-clip-weights"]) == 0
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=VOCAB.size, max_positions=MAX_POSITIONS, init_std=0.3)
    model = build_model(cfg)
    torch.save({"model": model.state_dict(), "jam_config": cfg.to_dict(), "jam_vocab": VOCAB.to_dict()},
               d / "checkpoint.pt")
    return d / "checkpoint.pt", d / "bank"


def generate(capsys, ckpt, *argv) -> list[dict]:
    rc = main(["--checkpoint", str(ckpt), "--tokenizer", "bytes", "--no-progress", *[str(a) for a in argv]])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return [json.loads(line) for line in out.out.splitlines()]


def text_ids(s: str) -> list[int]:
    return [VOCAB.text_start + b for b in s.encode()]


def body(bank: MemoryBank, doc_id: str) -> list[int]:
    """A bank document's tokens without its closing <eos> (the bank stores no <bos>)."""
    t = bank.tokens(bank.row_of(doc_id)).tolist()
    assert t[-1] == VOCAB.eos and VOCAB.bos not in t
    return t[:-1]


@pytest.mark.filterwarnings(RANDOM_CLIP)
def test_retrieved_documents_prefix_the_prompt(setup, capsys, tmp_path):
    ckpt, bank_dir = setup
    bank = MemoryBank.load(bank_dir)
    flags = ["--max-new-tokens", "12", "--no-guidance", "--min-images", "1"]
    [a] = generate(capsys, ckpt, "--prompt", PROMPT, "--retrieve", bank_dir, "--retrieve-threshold", "none",
                   *flags)
    rec = a["retrieval"]
    docs = [d["doc_id"] for d in rec["docs"]]
    # The prompt's own caption (c0, or its twin c5) scores ~1; the twin is then a duplicate.
    assert len(docs) == 2 and docs[0] in ("c0", "c5") and docs[1] not in ("c0", "c5")
    assert rec["docs"][0]["score"] > 0.999 >= rec["docs"][1]["score"]
    # [eos] doc_1 <eos> doc_2 <eos> prompt text, built here from the bank's token sequences.
    prefix = body(bank, docs[0]) + [VOCAB.eos] + body(bank, docs[1]) + [VOCAB.eos]
    assert a["prompt_ids"] == [VOCAB.eos] + prefix + text_ids(PROMPT)
    assert rec["prefix_start"] == 1 and rec["prefix_len"] == len(prefix)
    assert [d["prefix_tokens"] for d in rec["docs"]] == [len(body(bank, x)) + 1 for x in docs]
    assert bytes(a["segments"][0]["ids"]).decode(errors="replace") == a["segments"][0]["text"]
    # The same ids given explicitly give the same answer: the prefix is what the model saw.
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": a["prompt_ids"]}) + "\n")
    [b] = generate(capsys, ckpt, "--prompts", prompts, *flags)
    assert b["ids"] == a["ids"] and b["prompt_ids"] == a["prompt_ids"]
    # Negative control: without --retrieve the answer differs.
    [c] = generate(capsys, ckpt, "--prompt", PROMPT, *flags)
    assert c["prompt_ids"] == [VOCAB.eos] + text_ids(PROMPT) and c["ids"] != a["ids"]
    assert "retrieval" not in c


@pytest.mark.filterwarnings(RANDOM_CLIP)
def test_default_threshold_skips_documents_too_close_to_the_prompt(setup, capsys):
    ckpt, bank_dir = setup
    [a] = generate(capsys, ckpt, "--prompt", PROMPT, "--retrieve", bank_dir, "--retrieve-k", "3",
                   "--max-new-tokens", "2")
    docs = a["retrieval"]["docs"]
    assert len(docs) == 3 and not {d["doc_id"] for d in docs} & {"c0", "c5"}
    assert all(d["score"] <= 0.9 for d in docs)


@pytest.mark.filterwarnings(RANDOM_CLIP)
def test_unconditional_row_keeps_the_retrieved_prefix(setup, capsys, tmp_path):
    """With guidance scale 0 image codes are sampled from the unconditional row alone (Eq. 6)."""
    ckpt, bank_dir = setup
    n_img = VOCAB.image_tokens_per_image + 2  # <break> codes <break>
    # float64: the unconditional row is batched with other rows in the two runs (see _generation_util.float64)
    image = ["--images", "force", "--min-images", "3", "--max-new-tokens", 3 * n_img, "--top-p", "1",
             "--dtype", "float64"]
    [a] = generate(capsys, ckpt, "--prompt", PROMPT, "--retrieve", bank_dir, "--retrieve-threshold", "none",
                   "--guidance-scale", "0", *image)
    n = a["retrieval"]["prefix_len"]
    full = a["prompt_ids"]
    head_docs, text = full[: 1 + n], full[1 + n:]
    assert text == text_ids(PROMPT)
    # Expected unconditional row: [eos] docs <mask>, fed as the conditional row of an unguided run.
    prompts = tmp_path / "p.jsonl"
    rows = {"kept": head_docs + unconditional_prompt(text, vocab=VOCAB),
            "masked": unconditional_prompt(full, vocab=VOCAB)}  # the docs' text masked too
    assert rows["kept"] == head_docs + [VOCAB.mask_id] and rows["masked"] != rows["kept"]
    prompts.write_text("".join(json.dumps({"prompt_ids": r}) + "\n" for r in rows.values()))
    kept, masked = generate(capsys, ckpt, "--prompts", prompts, "--no-guidance", *image)
    assert a["ids"][0] == VOCAB.break_id and len(a["segments"]) == 3
    assert a["ids"] == kept["ids"]
    assert a["ids"] != masked["ids"]  # negative control: the default unconditional row differs


@pytest.mark.filterwarnings(RANDOM_CLIP)
def test_prefix_fits_the_context_left_by_prompt_and_new_tokens(setup, capsys):
    ckpt, bank_dir = setup
    bank = MemoryBank.load(bank_dir)
    prompt_len = 1 + len(PROMPT)
    room = 20  # less than one document: the first is cut (outside its image), the second dropped
    max_new = MAX_POSITIONS - prompt_len - room
    [a] = generate(capsys, ckpt, "--prompt", PROMPT, "--retrieve", bank_dir, "--retrieve-threshold", "none",
                   "--max-new-tokens", max_new, "--no-guidance", "--images", "forbid")
    rec = a["retrieval"]
    first = body(bank, rec["docs"][0]["doc_id"])
    assert first[: len(PROMPT)] == text_ids(PROMPT) and len(first) + 1 > room
    assert a["prompt_ids"] == [VOCAB.eos] + first[: room - 1] + [VOCAB.eos] + text_ids(PROMPT)
    assert [d["prefix_tokens"] for d in rec["docs"]] == [room, 0]
    assert len(a["prompt_ids"]) + max_new == MAX_POSITIONS
    # A cut that would split an image drops the whole image (and its opening <break>).
    room = len(first) - 2  # ... text <break> code code code | code <break>
    [b] = generate(capsys, ckpt, "--prompt", PROMPT, "--retrieve", bank_dir, "--retrieve-threshold", "none",
                   "--max-new-tokens", MAX_POSITIONS - prompt_len - room, "--no-guidance", "--images", "forbid")
    text_len = first.index(VOCAB.break_id)
    assert b["prompt_ids"] == [VOCAB.eos] + first[:text_len] + [VOCAB.eos] + text_ids(PROMPT)
    # No room at all: no prefix, the documents are still recorded.
    [c] = generate(capsys, ckpt, "--prompt", PROMPT, "--retrieve", bank_dir, "--max-new-tokens",
                   MAX_POSITIONS - prompt_len, "--no-guidance", "--images", "forbid")
    assert c["prompt_ids"] == [VOCAB.eos] + text_ids(PROMPT) and c["retrieval"]["prefix_len"] == 0
    assert len(c["retrieval"]["docs"]) == 2 and all(d["prefix_tokens"] == 0 for d in c["retrieval"]["docs"])


def test_random_clip_weights_warn_and_bad_inputs_fail(setup, capsys, tmp_path):
    ckpt, bank_dir = setup
    with pytest.warns(UserWarning, match="randomly initialised"):
        load_retriever(RetrievalOptions(bank_dir=bank_dir), vocab=VOCAB)
    with pytest.raises(ValueError, match="vocab manifest"):
        load_retriever(RetrievalOptions(bank_dir=bank_dir), vocab=tiny_manifest(text_size=80))
    with pytest.raises(FileNotFoundError, match="CLIP checkpoint not found"):
        load_retriever(RetrievalOptions(bank_dir=bank_dir, clip_checkpoint=str(tmp_path / "no.pt")), vocab=VOCAB)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": [VOCAB.eos, VOCAB.text_start + 7]}) + "\n")
    cases = [
        (["--prompts", prompts, "--retrieve", bank_dir], f"{prompts}:1: --retrieve needs a text prompt"),
        (["--prompt", "x", "--retrieve", tmp_path / "nobank"], "memory bank manifest not found"),
        (["--prompt", "x", "--retrieve", bank_dir, "--retrieve-k", "0"], "--retrieve-k must be >= 1"),
        (["--prompt", "x", "--clip-checkpoint", "w.pt"], "--clip-checkpoint is for --retrieve"),
    ]
    for argv, msg in cases:
        rc = main(["--checkpoint", str(ckpt), "--tokenizer", "bytes", "--no-progress", *[str(x) for x in argv]])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and err.count("\n") == 1, err


"""jam-retrieval CLI: build -> query -> neighbours -> index -> info, and one-line failures."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from jam_metaseq.retrieval.bank import MemoryBank
from jam_metaseq.retrieval.cli import main
from jam_metaseq.vocab import tiny_manifest

CAPTIONS = ["a red bicycle by the river", "a sleeping grey cat", "three boats at sunset",
            "snow on a mountain", "a bowl of green apples", "a red bicycle by the river",
            "children playing football", "an old stone bridge"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    vocab = tiny_manifest(text_size=256)
    vocab.save(d / "vocab.json")
    rng = np.random.default_rng(0)
    with open(d / "docs.jsonl", "w") as f:
        for i, c in enumerate(CAPTIONS):
            codes = rng.integers(0, vocab.image_codes, vocab.image_tokens_per_image).tolist()
            f.write(json.dumps({"id": f"c{i}", "segments": [{"text": c}, {"image_tokens": codes}]}) + "\n")
    common = ["--vocab", str(d / "vocab.json"), "--tokenizer", "bytes", "--clip-model", "jam-tiny-clip",
              "--random-clip-weights", "--shard-size", "3", "--query-vectors"]
    assert main(["build", str(d / "docs.jsonl"), "--out", str(d / "bank"), *common]) == 0
    return d, vocab


def test_build_writes_a_bank(setup, capsys):
    d, vocab = setup
    bank = MemoryBank.load(d / "bank")
    assert len(bank) == 8 and bank.dim == 32 and bank.query_vectors is not None
    assert bank.vocab == vocab
    # token sequences are the data pipeline's: caption bytes, framed image, <eos>
    t = bank.tokens(1)
    assert t[-1] == vocab.eos and int((t == vocab.break_id).sum()) == 2
    assert bytes((t[vocab.is_text(t)] - vocab.text_start).tolist()).decode() == CAPTIONS[1]
    assert main(["info", str(d / "bank")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 8 and info["encoder"]["model_name"] == "jam-tiny-clip"


def test_query_skips_the_exact_match_and_its_twin(setup, capsys):
    d, _ = setup
    bank = str(d / "bank")
    assert main(["query", bank, "--text", CAPTIONS[0], "-k", "3", "--score-threshold", "none",
                 "--duplicate-cosine", "none"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # captions 0 and 5 are the same text (the bank vectors are text-only here): both score 1
    assert {recs[0]["doc_id"], recs[1]["doc_id"]} == {"c0", "c5"} and recs[1]["score"] > 0.999
    # with the duplicate rule, the second of the twins is a duplicate of the first
    assert main(["query", bank, "--text", CAPTIONS[0], "-k", "3", "--score-threshold", "none"]) == 0
    ids = [json.loads(line)["doc_id"] for line in capsys.readouterr().out.splitlines()]
    assert len(ids) == 3 and ids[0] in ("c0", "c5") and len({"c0", "c5"} & set(ids)) == 1
    assert main(["query", str(d / "bank"), "--text", CAPTIONS[0], "--tokens"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(recs) == 2 and all(r["doc_id"] not in ("c0", "c5") and r["score"] <= 0.9 for r in recs)
    assert all(len(r["tokens"]) == r["length"] for r in recs)


def test_neighbours_and_reindex(setup, capsys):
    d, _ = setup
    bank_dir = str(d / "bank")
    # c0 and c5 share a caption and (text-only vectors here) a vector, but not their tokens
    assert main(["neighbours", bank_dir, "--score-threshold", "none"]) == 0
    capsys.readouterr()
    rows = np.load(d / "bank" / "neighbours.npy")
    assert rows[0, 0] == 5 and rows[5, 0] == 0
    assert main(["neighbours", bank_dir]) == 0  # default: the score-1 twin is too similar
    summary = json.loads(capsys.readouterr().out)
    rows = np.load(d / "bank" / "neighbours.npy")
    assert summary["documents"] == 8 and summary["k"] == 2 and rows.shape == (8, 2)
    assert 5 not in rows[0] and 0 not in rows[5]
    assert main(["neighbours", bank_dir, "--training", "-k", "3"]) == 0
    capsys.readouterr()
    rows = np.load(d / "bank" / "neighbours.npy")
    assert rows.shape == (8, 3) and all(i not in rows[i] for i in range(8))
    assert MemoryBank.load(d / "bank").manifest["neighbours"]["training"] is True
    assert main(["index", bank_dir, "--index", "hnsw", "--hnsw-m", "8"]) == 0
    capsys.readouterr()
    assert MemoryBank.load(d / "bank").index_config.kind == "hnsw"


def test_failures_exit_2_with_one_line(setup, tmp_path, capsys):
    d, _ = setup
    cases = [
        (["build", str(d / "docs.jsonl"), "--out", str(tmp_path / "b"), "--vocab", str(d / "vocab.json"),
          "--tokenizer", "bytes"], "--clip-checkpoint is required"),
        (["build", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "b"), "--vocab",
          str(d / "vocab.json"), "--tokenizer", "bytes", "--random-clip-weights"], "missing.jsonl"),
        (["build", str(d / "docs.jsonl"), "--out", str(tmp_path / "b"), "--vocab", str(d / "vocab.json"),
          "--tokenizer", "bytes", "--clip-checkpoint", str(tmp_path / "w.pt")], "CLIP checkpoint not found"),
        (["query", str(tmp_path / "nobank"), "--text", "x"], "manifest not found"),
        (["query", str(d / "bank")], "--text and/or --image"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_help_explains_every_flag():
    out = subprocess.run([sys.executable, "-m", "jam_metaseq.retrieval.cli", "build", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--clip-checkpoint", "--shard-size", "--query-vectors", "--index", "--nprobe", "--hnsw-m"):
        assert flag in out

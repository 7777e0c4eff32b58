"""Retrieval augmentation in training, end to end (paper §3.1 "Retrieval Augmentation"; issue 7.5).

The user's command sequence, run here on a tiny set (bytes tokenizer, random-weight tiny CLIP):

    jam-data vocab --tokenizer bytes ... --out vocab.json
    jam-data binarize docs.jsonl --vocab vocab.json --tokenizer bytes --break-mode eos --out DATA/train/caption
    jam-retrieval build docs.jsonl --out BANK --vocab vocab.json --tokenizer bytes ...
    jam-retrieval neighbours BANK --dataset DATA/train/caption
    fairseq-train DATA --task cm3_multimodal --retrieval-bank BANK --retrieval-k 2 --retrieval-weight 0.1 ...

Checked: the block -> document -> bank-row mapping (hand-computed cases and the real files), that a
task item is ``retrieved docs (<eos>-separated) + block`` with the truncation rule and the prefix
loss weight, that mismatched or stale neighbour files are refused with a message naming the file,
and that a short real ``fairseq-train`` run trains on the longer, prefixed items.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jam_metaseq.data.binarize import open_dataset
from jam_metaseq.data.cli import main as data_main
from jam_metaseq.task.items import CM3Items, DataSetupError, TaskOptions
from jam_metaseq.objectives.cm3 import CM3Config
from jam_metaseq.retrieval.bank import MemoryBank
from jam_metaseq.retrieval.cli import main as retrieval_main
from jam_metaseq.retrieval.retriever import block_neighbours, load_block_neighbours
from jam_metaseq.vocab import VocabManifest

ROOT = Path(__file__).resolve().parent.parent
USER_DIR = str(ROOT / "jam_metaseq")
BIN = Path(sys.executable).parent
WORDS = ["red", "blue", "cat", "dog", "tree", "car", "house", "river", "sky", "boat", "bird", "hill"]
N_DOCS = 24
BLOCK = 48  # binarize block size (documents here are shorter: one document per block)
K = 2


def _write_docs(path: Path, vocab: VocabManifest, *, n: int, seed: int) -> None:
    """Captions (bytes tokenizer) with a 2x2 image of codes, some text-only documents."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            caption = " ".join(rng.choice(WORDS, size=3)) + f" {i}"
            segs: list[dict] = [{"text": caption}]
            if i % 4 != 3:
                codes = rng.integers(0, vocab.image_codes, vocab.image_tokens_per_image).tolist()
                segs.append({"image_tokens": codes})
            f.write(json.dumps({"id": f"d{i}", "segments": segs}) + "\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The documented command sequence, in-process: vocab, binarize, bank, neighbours."""
    d = tmp_path_factory.mktemp("ra")
    assert data_main(["vocab", "--tokenizer", "bytes", "--image-codes", "32", "--image-grid", "2", "2",
                      "--sentinels", "4", "--out", str(d / "vocab.json")]) == 0
    vocab = VocabManifest.load(d / "vocab.json")
    _write_docs(d / "docs.jsonl", vocab, n=N_DOCS, seed=0)
    (d / "data" / "train").mkdir(parents=True)
    prefix = d / "data" / "train" / "caption"
    assert data_main(["binarize", str(d / "docs.jsonl"), "--vocab", str(d / "vocab.json"), "--tokenizer",
                      "bytes", "--block-size", str(BLOCK), "--break-mode", "eos", "--out", str(prefix)]) == 0
    bank_dir = d / "bank"
    assert retrieval_main(["build", str(d / "docs.jsonl"), "--out", str(bank_dir), "--vocab",
                           str(d / "vocab.json"), "--tokenizer", "bytes", "--clip-model", "jam-tiny-clip",
                           "--random-clip-weights", "--shard-size", "8"]) == 0
    # random CLIP weights put every vector close together: no relevance threshold, or nothing passes
    assert retrieval_main(["neighbours", str(bank_dir), "-k", str(K), "--dataset", str(prefix),
                           "--score-threshold", "none", "--duplicate-cosine", "none"]) == 0
    return d, vocab, str(prefix), bank_dir


# ---- the block -> bank-row mapping ------------------------------------------------------------
def test_block_neighbours_hand_computed():
    doc_rows = np.array([[2, 1], [3, 0], [0, -1], [1, 2]])
    docs = np.array([0, 3, 5, 9, 12])
    # complete-style packing: block 0 = documents 0 and 1, block 1 = document 2, block 2 = document 3
    out = block_neighbours(doc_rows, doc_offsets=docs, block_offsets=np.array([0, 5, 9, 12]))
    # block 0: rank 1 of doc 0 (row 2), rank 1 of doc 1 (row 3); one-document blocks copy their row
    assert out.tolist() == [[2, 3], [0, -1], [1, 2]]
    # document 0 cut over two blocks: block 1 = its tail + document 1; block 2 = documents 2, 3
    # (row 2, document 3's second neighbour, is the block's own document 2: skipped)
    out = block_neighbours(doc_rows, doc_offsets=docs, block_offsets=np.array([0, 2, 5, 12]), k=3)
    assert out.tolist() == [[2, 1, -1], [2, 3, -1], [0, 1, -1]]
    # own documents and repeats are skipped; row_offset places the documents in the bank
    out = block_neighbours(np.array([[11, 14], [10, 14]]), doc_offsets=np.array([0, 2, 4]),
                           block_offsets=np.array([0, 4]), row_offset=10)
    assert out.tolist() == [[14, -1]]
    with pytest.raises(ValueError, match="one row per document"):
        block_neighbours(doc_rows[:3], doc_offsets=docs, block_offsets=np.array([0, 12]))


def test_neighbours_files_align_blocks_documents_and_bank_rows(setup):
    d, vocab, prefix, bank_dir = setup
    ds = open_dataset(prefix)
    bank = MemoryBank.load(bank_dir)
    assert len(ds) == ds.num_documents == len(bank) == N_DOCS  # eos mode: one document per block
    per_doc = np.load(bank_dir / "neighbours.npy")
    per_block = np.load(prefix + ".neighbours.npy")
    assert per_block.shape == (N_DOCS, K) and per_block.dtype == np.int64
    np.testing.assert_array_equal(per_block, per_doc)
    for b in range(N_DOCS):
        assert ds[b]["tokens"].tolist() == bank.tokens(b).tolist()  # block b = document b = bank row b
        assert b not in per_block[b].tolist() and (per_block[b] >= 0).all()
    meta = json.loads(Path(prefix + ".neighbours.info").read_text())
    assert meta["bank_count"] == N_DOCS and meta["num_blocks"] == N_DOCS and meta["row_offset"] == 0


def test_neighbours_files_of_the_older_spelling_are_still_read(setup, tmp_path):
    """``.neighbors.npy`` / ``.neighbors.info`` (written before one spelling was settled on) are
    read like the current files, checks included: renaming must not silently drop retrieval."""
    from jam_metaseq.retrieval.retriever import load_block_neighbours

    d, vocab, prefix, bank_dir = setup
    old = str(tmp_path / "old")
    want = np.load(prefix + ".neighbours.npy")
    np.save(old + ".neighbors.npy", want)
    shutil.copy(prefix + ".neighbours.info", old + ".neighbors.info")
    np.testing.assert_array_equal(load_block_neighbours(old, num_blocks=N_DOCS, bank_size=N_DOCS), want)
    with pytest.raises(ValueError, match=r"old\.neighbors\.info: made for a bank of"):
        load_block_neighbours(old, num_blocks=N_DOCS, bank_size=N_DOCS + 1)
    assert load_block_neighbours(str(tmp_path / "none"), num_blocks=N_DOCS, bank_size=N_DOCS) is None


def test_neighbours_refuses_a_dataset_that_is_not_the_bank(setup, tmp_path, capsys):
    d, vocab, prefix, bank_dir = setup
    # same number of documents, other order: counts agree, contents do not
    lines = (d / "docs.jsonl").read_text().splitlines()
    (tmp_path / "rev.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    rev = tmp_path / "rev"
    assert data_main(["binarize", str(tmp_path / "rev.jsonl"), "--vocab", str(d / "vocab.json"),
                      "--tokenizer", "bytes", "--block-size", str(BLOCK), "--break-mode", "eos",
                      "--out", str(rev)]) == 0
    capsys.readouterr()
    assert retrieval_main(["neighbours", str(bank_dir), "--dataset", str(rev)]) == 2
    err = capsys.readouterr().err
    assert "document 0 holds other tokens than bank row 0" in err and str(rev) in err
    assert not Path(f"{rev}.neighbours.npy").exists()
    # half the documents: the counts disagree
    (tmp_path / "half.jsonl").write_text("\n".join(lines[:12]) + "\n")
    assert data_main(["binarize", str(tmp_path / "half.jsonl"), "--vocab", str(d / "vocab.json"),
                      "--tokenizer", "bytes", "--out", str(tmp_path / "half")]) == 0
    capsys.readouterr()
    assert retrieval_main(["neighbours", str(bank_dir), "--dataset", str(tmp_path / "half")]) == 2
    assert "hold 12 documents" in capsys.readouterr().err


def test_two_datasets_one_bank_complete_packing(setup, tmp_path, capsys):
    """A bank over two JSONL files: each dataset's documents are bank rows after the other's;
    complete packing puts several documents in a block, whose neighbours are merged."""
    d, vocab, _, _ = setup
    lines = (d / "docs.jsonl").read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:10]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[10:]) + "\n")
    for name, extra in (("a", ["--break-mode", "eos"]), ("b", ["--break-mode", "complete"])):
        assert data_main(["binarize", str(tmp_path / f"{name}.jsonl"), "--vocab", str(d / "vocab.json"),
                          "--tokenizer", "bytes", "--block-size", "60", *extra, "--out", str(tmp_path / name)]) == 0
    bank_dir = tmp_path / "bank"
    assert retrieval_main(["build", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--out", str(bank_dir),
                           "--vocab", str(d / "vocab.json"), "--tokenizer", "bytes", "--clip-model",
                           "jam-tiny-clip", "--random-clip-weights"]) == 0
    capsys.readouterr()
    # wrong order: document 0 of b is not bank row 0
    assert retrieval_main(["neighbours", str(bank_dir), "--dataset", str(tmp_path / "b"),
                           "--dataset", str(tmp_path / "a"), "--check-documents", "all"]) == 2
    assert "holds other tokens than bank row 0" in capsys.readouterr().err
    assert retrieval_main(["neighbours", str(bank_dir), "-k", "3", "--score-threshold", "none",
                           "--dataset", str(tmp_path / "a"), "--dataset", str(tmp_path / "b"),
                           "--check-documents", "all"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [x["row_offset"] for x in summary["datasets"]] == [0, 10]
    per_doc = np.load(bank_dir / "neighbours.npy")
    a, b = open_dataset(tmp_path / "a"), open_dataset(tmp_path / "b")
    np.testing.assert_array_equal(np.load(f"{tmp_path / 'a'}.neighbours.npy"), per_doc[:10])
    nb = np.load(f"{tmp_path / 'b'}.neighbours.npy")
    assert len(b) < b.num_documents and nb.shape == (len(b), 3)  # several documents per block
    for blk in range(len(b)):
        s, e = int(b.block_offsets[blk]), int(b.block_offsets[blk + 1])
        docs = [j for j in range(b.num_documents) if b.doc_offsets[j] < e and b.doc_offsets[j + 1] > s]
        own = {10 + j for j in docs}
        # round-robin by rank over the block's documents, own rows and repeats skipped
        want: list[int] = []
        for rank in range(3):
            for j in docs:
                r = int(per_doc[10 + j, rank])
                if r >= 0 and r not in own and r not in want and len(want) < 3:
                    want.append(r)
        assert nb[blk][nb[blk] >= 0].tolist() == want


# ---- the task's items -------------------------------------------------------------------------
def _items(prefix: str, bank_dir: Path, vocab: VocabManifest, *, T: int, train: bool = False,
           k: int = K, weight: float = 0.1) -> CM3Items:
    opts = TaskOptions(data=str(Path(prefix).parent.parent), tokens_per_sample=T, retrieval_bank=str(bank_dir),
                       retrieval_k=k, retrieval_weight=weight, seed=3,
                       cm3=CM3Config(min_spans=0, max_spans=vocab.num_sentinels))
    return CM3Items({"caption": open_dataset(prefix, vocab=vocab)}, vocab=vocab, opts=opts, train=train)


def _whole(item) -> list[int]:
    return item["source"].tolist() + item["target"][-1:].tolist()


def test_item_is_retrieved_docs_then_block_with_prefix_weight(setup):
    d, vocab, prefix, bank_dir = setup
    ds, bank = open_dataset(prefix), MemoryBank.load(bank_dir)
    nb = np.load(prefix + ".neighbours.npy")
    items = _items(prefix, bank_dir, vocab, T=200)  # validation items: no CM3 transform, room = T + 1
    for i in range(N_DOCS):
        r1, r2 = nb[i].tolist()
        # bank documents end with <eos>, the separator: layout r1 <eos> r2 <eos> block
        prefix_ids = bank.tokens(r1).tolist() + bank.tokens(r2).tolist()
        want = prefix_ids + ds[i]["tokens"].tolist()
        it = items[i]
        assert _whole(it) == want
        P = len(prefix_ids)
        w = it["weights"].numpy()  # target-aligned: target t is token t + 1
        np.testing.assert_allclose(w[:P - 1], 0.1)
        np.testing.assert_allclose(w[P - 1:], 1.0)
    # a DataLoader worker gets a pickled copy (memory maps reopened there): same items
    assert _whole(pickle.loads(pickle.dumps(items))[4]) == _whole(items[4])
    # k = 1: only the best neighbour
    one = _items(prefix, bank_dir, vocab, T=200, k=1)
    assert _whole(one[5]) == bank.tokens(int(nb[5, 0])).tolist() + ds[5]["tokens"].tolist()


def test_prefix_truncation_fits_tokens_per_sample(setup):
    d, vocab, prefix, bank_dir = setup
    ds, bank = open_dataset(prefix), MemoryBank.load(bank_dir)
    nb = np.load(prefix + ".neighbours.npy")
    i = 7
    block = ds[i]["tokens"].tolist()
    d1, d2 = bank.tokens(int(nb[i, 0])).tolist(), bank.tokens(int(nb[i, 1])).tolist()
    # room for the block, document 1 whole, and 3 more tokens: 2 (text) tokens of document 2 + <eos>
    T = len(block) + len(d1) + 3 - 1
    it = _items(prefix, bank_dir, vocab, T=T)[i]
    assert _whole(it) == d1 + d2[:2] + [vocab.eos] + block
    assert it["source"].numel() == T
    # room for the block and 1 token: nothing is worth prefixing (a body token needs its separator)
    it = _items(prefix, bank_dir, vocab, T=len(block))[i]
    assert _whole(it) == block
    # no room for the block: the block keeps its first room - 1 tokens, the prefix gets one token
    # too few to be used (< 2): the item is the block cut to fit
    it = _items(prefix, bank_dir, vocab, T=len(block) - 5)[i]
    assert _whole(it) == block[:len(block) - 5] and it["source"].numel() < len(block) - 5


def test_training_items_fit_and_carry_prefix_weights(setup):
    d, vocab, prefix, bank_dir = setup
    T = 64
    items = _items(prefix, bank_dir, vocab, T=T, train=True)
    ds = open_dataset(prefix)
    prefixed = 0
    for i in range(len(items)):
        it = items[i]
        assert it["source"].numel() <= T  # CM3 sentinels included
        w = it["weights"].numpy()
        n_prefix = int(np.isclose(w, 0.1).sum())
        block = int(items._idx[i])
        # room = T + 1 - 3 * max_spans; a prefix exists whenever the block leaves 2+ tokens of it
        if T + 1 - 3 * vocab.num_sentinels - min(len(ds[block]["tokens"]), T - 3 * vocab.num_sentinels) >= 2:
            assert n_prefix > 0, i
            prefixed += 1
    assert prefixed > len(items) // 2
    # the same item twice (another worker, a resumed run) is the same
    assert torch.equal(items[3]["source"], _items(prefix, bank_dir, vocab, T=T, train=True)[3]["source"])


def test_task_refuses_stale_or_missing_neighbours(setup, tmp_path):
    d, vocab, prefix, bank_dir = setup
    # a copy of the dataset re-packed into fewer blocks, with the old per-document file beside it
    other = tmp_path / "train" / "caption"
    other.parent.mkdir(parents=True)
    assert data_main(["binarize", str(d / "docs.jsonl"), "--vocab", str(d / "vocab.json"), "--tokenizer",
                      "bytes", "--block-size", "200", "--out", str(other)]) == 0
    np.save(f"{other}.neighbours.npy", np.load(prefix + ".neighbours.npy"))
    with pytest.raises(DataSetupError, match=r"caption\.neighbours\.npy: shape \(24, 2\).*jam-retrieval neighbours"):
        _items(str(other), bank_dir, vocab, T=64, train=True)
    # no neighbours at all for the training sources
    os.remove(f"{other}.neighbours.npy")
    with pytest.raises(DataSetupError, match="no training source has a neighbours file"):
        _items(str(other), bank_dir, vocab, T=64, train=True)
    # rows outside the bank
    np.save(f"{other}.neighbours.npy", np.full((len(open_dataset(other)), 2), N_DOCS, np.int64))
    with pytest.raises(ValueError, match="out of range"):
        load_block_neighbours(str(other), num_blocks=len(open_dataset(other)), bank_size=N_DOCS)


# ---- the real trainer ---------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_fairseq_train_with_retrieval_bank(setup):
    pytest.importorskip("fairseq")
    d, vocab, prefix, bank_dir = setup
    T, B = 96, 4
    save = d / "ckpt"
    cmd = [str(BIN / "fairseq-train"), str(d / "data"), "--user-dir", USER_DIR, "--task", "cm3_multimodal",
           "--criterion", "cm3", "--arch", "jam_cross_tiny", "--cross-every", "1", "--max-target-positions", str(T), "--cpu", "--num-workers", "0",
           "--tokens-per-sample", str(T), "--seed", "1", "--retrieval-bank", str(bank_dir),
           "--retrieval-k", str(K), "--retrieval-weight", "0.1", "--optimizer", "adam", "--lr", "1e-3",
           "--batch-size", str(B), "--max-tokens", str(B * T), "--required-batch-size-multiple", "1", "--max-update", "4", "--log-format", "json",
           "--log-interval", "1", "--disable-validation", "--no-epoch-checkpoints", "--save-dir", str(save)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert f"retrieval prefixes from {bank_dir}" in out and "for sources ['caption']" in out
    logs = [json.loads(line.split("| train_inner |", 1)[1]) for line in out.splitlines() if "| train_inner |" in line]
    assert [int(r["num_updates"]) for r in logs] == [1, 2, 3, 4]
    assert all(np.isfinite(float(r["loss"])) for r in logs)
    # without prefixes an item is at most one block + CM3 sentinels: the batches are longer than that
    longest_plain = B * (int(open_dataset(prefix).sizes.max()) + 3 * vocab.num_sentinels)
    assert max(float(r["wpb"]) for r in logs) > longest_plain, [r["wpb"] for r in logs]
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert int(state["optimizer_history"][-1]["num_updates"]) == 4

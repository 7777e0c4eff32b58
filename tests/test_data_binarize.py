"""Packing policies, the memory-mapped binarized format, and the jam-data CLI."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jam_metaseq.data.binarize import binarize, open_dataset
from jam_metaseq.data.cli import main
from jam_metaseq.data.documents import DocumentError, tokenize_document
from jam_metaseq.data.packing import BREAK_MODES, gather_blocks, pack_offsets
from jam_metaseq.data.tokenizers import ByteTokenizer
from jam_metaseq.objectives.cm3 import cm3_inverse, cm3_transform
from jam_metaseq.vocab import VocabManifest, tiny_manifest

V = tiny_manifest(text_size=256, image_codes=32, image_grid=(2, 2), num_sentinels=4)
BYTES = ByteTokenizer()


# ---- packing ---------------------------------------------------------------------------------------
def test_pack_offsets_hand_cases():
    lengths = [3, 5, 2, 9, 1]  # stream offsets 0 3 8 10 19 20
    assert pack_offsets(lengths, block_size=8, break_mode="none").tolist() == [0, 8, 16, 20]
    assert pack_offsets(lengths, block_size=8, break_mode="eos").tolist() == [0, 3, 8, 10, 18, 19, 20]
    # complete takes whole documents while they fit: [0,8) = docs 0,1; [8,10) = doc 2 (doc 3 does
    # not fit after it); doc 3 (9 > 8) is cut: [10,18); its last token and doc 4 share [18,20)
    assert pack_offsets(lengths, block_size=8, break_mode="complete").tolist() == [0, 8, 10, 18, 20]
    assert pack_offsets([], block_size=8).tolist() == [0]
    with pytest.raises(ValueError, match="break_mode"):
        pack_offsets(lengths, block_size=8, break_mode="doc")


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30), block_size=st.integers(1, 32),
       mode=st.sampled_from(BREAK_MODES))
def test_packing_round_trip(lengths, block_size, mode):
    offsets = pack_offsets(lengths, block_size=block_size, break_mode=mode)
    total = sum(lengths)
    sizes = np.diff(offsets)
    assert offsets[0] == 0 and offsets[-1] == total and np.all(sizes >= 1) and np.all(sizes <= block_size)
    doc_ends = set(np.cumsum(lengths).tolist())
    if mode in ("complete", "eos"):
        # a block boundary inside a document only where that document is longer than block_size
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        for b in offsets[1:-1].tolist():
            if b not in doc_ends:
                j = int(np.searchsorted(np.cumsum(lengths), b, side="right"))
                assert lengths[j] > block_size and (b - starts[j]) % block_size == 0
    if mode == "eos":
        assert doc_ends <= set(offsets.tolist())
    # round trip through the padded gather: blocks concatenate back to the stream
    stream = np.arange(total, dtype=np.int64) + 10
    blocks = gather_blocks(stream, offsets, pad=1)
    assert np.array_equal(np.concatenate([blocks[i, :s] for i, s in enumerate(sizes)]), stream)
    assert np.all(blocks[np.arange(blocks.shape[1])[None, :] >= sizes[:, None]] == 1)


# ---- binarized storage ----------------------------------------------------------------------------
DOCS = [
    [{"text": "a cat"}, {"image_tokens": [1, 2, 3, 4]}],
    [{"image_tokens": [5, 6, 7, 8]}, {"text": "a dog on a mat"}],
    {"prompt": "Q: why?", "response": [{"text": "because"}]},
    [{"text": "plain text only, somewhat longer than the others"}],
]


def write_jsonl(path, docs, extra_lines=()):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs) + "".join(l + "\n" for l in extra_lines))
    return path


def test_binarize_round_trip(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS[:2])
    src2 = write_jsonl(tmp_path / "b.jsonl", DOCS[2:])
    index = binarize([src, src2], out_prefix=tmp_path / "out" / "ds", vocab=V, text_tokenizer=BYTES,
                     block_size=16, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "ds.blocks.bin", "ds.docs.bin", "ds.json", "ds.mask.bin", "ds.tokens.bin", "ds.vocab.json"]
    ds = open_dataset(tmp_path / "out" / "ds", vocab=V)
    expected = [tokenize_document(d, vocab=V, text_tokenizer=BYTES) for d in DOCS]
    assert ds.num_documents == 4 and index["num_tokens"] == sum(t.size for t, _ in expected)
    for j, (t, m) in enumerate(expected):
        doc = ds.document(j)
        assert np.array_equal(doc["tokens"], t) and np.array_equal(doc["loss_mask"], m)
    # blocks concatenate to the stream, sizes agree, items are int64 / bool
    stream = np.concatenate([t for t, _ in expected])
    items = [ds[i] for i in range(len(ds))]
    assert np.array_equal(np.concatenate([it["tokens"] for it in items]), stream)
    assert [it["tokens"].size for it in items] == ds.sizes.tolist()
    assert items[0]["tokens"].dtype == np.int64 and items[0]["loss_mask"].dtype == bool
    assert ds.sizes.max() <= 16 and ds.vocab == V
    assert index["report"]["images"] == 2 and index["report"]["documents"] == 4
    # re-packing at open time; pickling (DataLoader workers) reopens the maps
    ds8 = open_dataset(tmp_path / "out" / "ds", block_size=8, break_mode="none")
    assert ds8.sizes.max() == 8 and ds8.sizes.sum() == stream.size
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(clone[1]["tokens"], ds[1]["tokens"])
    assert len(pickle.dumps(ds)) < 10_000  # the token maps are not pickled


def test_binarized_item_through_cm3(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    binarize(src, out_prefix=tmp_path / "ds", vocab=V, text_tokenizer=BYTES, block_size=64, progress=False)
    ds = open_dataset(tmp_path / "ds")
    item = ds[0]
    out, w = cm3_transform(item["tokens"], np.random.default_rng(0), vocab=V, min_spans=2, max_spans=4,
                           return_loss_weights=True, loss_mask=item["loss_mask"])
    assert np.array_equal(cm3_inverse(out, vocab=V), item["tokens"])
    assert w.sum() <= item["loss_mask"].sum() + 4  # + one <eoss> per span at most


def test_binarize_without_masked_tokens_writes_no_mask(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS[:2])
    index = binarize(src, out_prefix=tmp_path / "ds", vocab=V, text_tokenizer=BYTES, progress=False)
    assert not index["has_loss_mask"] and not (tmp_path / "ds.mask.bin").exists()
    assert open_dataset(tmp_path / "ds")[0]["loss_mask"].all()
    assert index["dtype"] == "uint16"


def test_binarize_errors_and_skips(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS[:2], extra_lines=["{oops"])
    with pytest.raises(DocumentError, match=r"a\.jsonl:3: bad JSON"):
        binarize(src, out_prefix=tmp_path / "ds", vocab=V, text_tokenizer=BYTES, progress=False)
    assert not list(tmp_path.glob("ds*"))  # nothing half-written
    index = binarize(src, out_prefix=tmp_path / "ds", vocab=V, text_tokenizer=BYTES, on_error="skip",
                     progress=False)
    assert index["report"]["skipped"] == {"bad_json": 1} and index["num_documents"] == 2
    other = tiny_manifest(text_size=256, image_codes=64, image_grid=(2, 2), num_sentinels=4)
    with pytest.raises(ValueError, match="binarized with a vocabulary of"):
        open_dataset(tmp_path / "ds", vocab=other)
    with pytest.raises(FileNotFoundError, match="no binarized dataset"):
        open_dataset(tmp_path / "missing")


# ---- CLI --------------------------------------------------------------------------------------------
def test_cli_vocab_validate_binarize_stats(tmp_path, capsys):
    vocab_path = tmp_path / "vocab.json"
    assert main(["vocab", "--tokenizer", "bytes", "--image-codes", "32", "--image-grid", "2", "2",
                 "--sentinels", "4", "--out", str(vocab_path)]) == 0
    assert VocabManifest.load(vocab_path) == dataclasses.replace(V, text_tokenizer="bytes")
    src = write_jsonl(tmp_path / "a.jsonl", DOCS, extra_lines=['[{"image_tokens": [1]}]'])
    capsys.readouterr()
    common = ["--vocab", str(vocab_path), "--tokenizer", "bytes", "--json"]
    assert main(["validate", str(src), *common]) == 1  # one bad line
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["documents"] == 4 and summary["skipped"] == {"image_token_count": 1}
    assert "a.jsonl:5: segment 0: 1 image tokens, expected 4" in err
    # binarize fails on the bad line by default, with a one-line message
    assert main(["binarize", str(src), "--out", str(tmp_path / "ds"), *common]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("jam-data binarize: error: ")
    assert main(["binarize", str(src), "--out", str(tmp_path / "ds"), "--on-error", "skip",
                 "--block-size", "32", *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["blocks"] >= 1 and summary["skipped_total"] == 1
    assert main(["stats", str(tmp_path / "ds"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["images"] == 2 and stats["image_tokens"] == 8 and stats["documents"] == 4
    assert stats["text_tokens"] == summary["text_tokens"] and stats["tokens"] == summary["tokens"]
    assert stats["loss_tokens"] == stats["tokens"] - len("Q: why?")


def test_cli_help_explains_every_flag(capsys):
    for cmd in ("vocab", "validate", "binarize", "stats"):
        with pytest.raises(SystemExit) as info:
            main([cmd, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert "--json" in text or cmd == "vocab"
    with pytest.raises(SystemExit):
        main(["validate"])  # missing inputs

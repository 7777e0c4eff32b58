"""Memory bank: disk round trip, build over JSONL + images, resuming an interrupted build (§3.1)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jam_metaseq.data.documents import tokenize_document
from jam_metaseq.data.tokenizers import ByteTokenizer
from jam_metaseq.retrieval.bank import (BankBuildConfig, MemoryBank, build_memory_bank, content_hash,
                                        document_parts, read_documents, write_memory_bank)
from jam_metaseq.retrieval.index import IndexConfig, search
from jam_metaseq.vocab import tiny_manifest
from _retrieval_util import GreyGridTokenizer, clustered_unit_vectors, tiny_encoder, write_docs

VOCAB = tiny_manifest(text_size=256)
IMAGE_TOK = GreyGridTokenizer(grid=VOCAB.image_grid, codes=VOCAB.image_codes)


def _tokenize(d):
    return tokenize_document(d.doc, vocab=VOCAB, text_tokenizer=ByteTokenizer(), image_tokenizer=IMAGE_TOK,
                             base_dir=d.base_dir)


def test_write_load_round_trip(tmp_path):
    xb = clustered_unit_vectors(200, 8, clusters=4, spread=0.5, seed=0)
    toks = [np.arange(4, 4 + (i % 9) + 1) for i in range(200)]
    ids = [f"id-{i}" for i in range(200)]
    bank = write_memory_bank(out_dir=tmp_path / "b", vectors=xb, doc_ids=ids, token_seqs=toks, vocab=VOCAB,
                             config=BankBuildConfig(index=IndexConfig(kind="ivf", nlist=4, nprobe=4)))
    again = MemoryBank.load(tmp_path / "b")
    assert len(again) == 200 and again.dim == 8 and again.doc_ids == ids
    np.testing.assert_array_equal(np.asarray(again.vectors), xb)
    for i in (0, 57, 199):
        assert again.tokens(i).tolist() == toks[i].tolist()
        assert int(again.hashes[i]) == content_hash(toks[i])
    assert again.row_of("id-57") == 57
    assert again.vocab == VOCAB
    assert again.index_config.kind == "ivf"
    index = again.load_index()
    _, rows = search(index, xb[:20], k=1)
    assert rows[:, 0].tolist() == list(range(20))  # nprobe = nlist: exact
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(
        ["manifest.json", "vectors.npy", "tokens.npy", "offsets.npy", "hashes.npy", "doc_ids.json", "index.faiss"])
    with pytest.raises(FileExistsError):
        write_memory_bank(out_dir=tmp_path / "b", vectors=xb, doc_ids=ids, token_seqs=toks)
    with pytest.raises(IndexError):
        again.tokens(200)


def test_rebuild_index_changes_kind(tmp_path):
    xb = clustered_unit_vectors(300, 8, clusters=4, spread=0.5, seed=0)
    bank = write_memory_bank(out_dir=tmp_path / "b", vectors=xb, doc_ids=[str(i) for i in range(300)],
                             token_seqs=[np.array([5])] * 300)
    bank.rebuild_index(config=IndexConfig(kind="hnsw", hnsw_m=8))
    again = MemoryBank.load(tmp_path / "b")
    assert again.index_config.kind == "hnsw" and again.index_config.hnsw_m == 8
    assert again.load_index().ntotal == 300


def test_content_hash_ignores_dtype():
    a = np.array([1, 2, 3], np.int32)
    assert content_hash(a) == content_hash(a.astype(np.int64))
    assert content_hash(a) != content_hash(np.array([1, 2, 4]))


def test_build_from_jsonl_stores_tokens_and_vectors(tmp_path):
    path = write_docs(tmp_path / "d", 7)
    enc = tiny_encoder()
    bank = build_memory_bank(documents=read_documents([path]), out_dir=tmp_path / "bank", encoder=enc,
                             tokenize=_tokenize, config=BankBuildConfig(shard_size=3), sources=[str(path)],
                             vocab=VOCAB, progress=False)
    docs = list(read_documents([path]))
    assert bank.doc_ids == [f"doc{i}" for i in range(7)]
    for i, d in enumerate(docs):
        assert bank.tokens(i).tolist() == _tokenize(d)[0].tolist()
    want = enc.encode_documents([document_parts(d) for d in docs])
    np.testing.assert_allclose(np.asarray(bank.vectors), want, atol=1e-6)
    assert int((bank.tokens(0) == VOCAB.break_id).sum()) == 2  # doc0: caption + one framed image
    assert int((bank.tokens(2) == VOCAB.break_id).sum()) == 0  # doc2: caption only
    assert not (tmp_path / "bank" / "shards").exists() and not (tmp_path / "bank" / "build_state.json").exists()


class _Boom(RuntimeError):
    pass


def test_interrupted_build_resumes_without_reencoding(tmp_path):
    path = write_docs(tmp_path / "d", 8)
    enc = tiny_encoder()
    calls: list[str] = []

    def failing(d):
        if d.doc_id == "doc6":
            raise _Boom("interrupted")
        calls.append(d.doc_id)
        return _tokenize(d)

    cfg = BankBuildConfig(shard_size=3, store_query_vectors=True)
    with pytest.raises(_Boom):
        build_memory_bank(documents=read_documents([path]), out_dir=tmp_path / "bank", encoder=enc,
                          tokenize=failing, config=cfg, sources=[str(path)], progress=False)
    state = json.loads((tmp_path / "bank" / "build_state.json").read_text())
    assert [s["count"] for s in state["shards"]] == [3, 3]
    with pytest.raises(FileNotFoundError, match="unfinished build"):
        MemoryBank.load(tmp_path / "bank")

    calls.clear()

    def counting(d):
        calls.append(d.doc_id)
        return _tokenize(d)

    resumed = build_memory_bank(documents=read_documents([path]), out_dir=tmp_path / "bank", encoder=enc,
                                tokenize=counting, config=cfg, sources=[str(path)], progress=False)
    assert calls == ["doc6", "doc7"]  # finished shards were not redone
    fresh = build_memory_bank(documents=read_documents([path]), out_dir=tmp_path / "fresh", encoder=enc,
                              tokenize=_tokenize, config=cfg, sources=[str(path)], progress=False)
    assert resumed.doc_ids == fresh.doc_ids
    np.testing.assert_allclose(np.asarray(resumed.vectors), np.asarray(fresh.vectors), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(resumed.query_vectors), np.asarray(fresh.query_vectors))
    np.testing.assert_array_equal(resumed.offsets, fresh.offsets)
    # a finished bank is returned as is by a rerun
    again = build_memory_bank(documents=iter(()), out_dir=tmp_path / "bank", encoder=enc,
                              tokenize=counting, config=cfg, sources=[str(path)], progress=False)
    assert len(again) == 8


def test_resume_with_other_inputs_is_refused(tmp_path):
    path = write_docs(tmp_path / "d", 5)
    enc = tiny_encoder()

    def failing(d):
        if d.doc_id == "doc3":
            raise _Boom("interrupted")
        return _tokenize(d)

    with pytest.raises(_Boom):
        build_memory_bank(documents=read_documents([path]), out_dir=tmp_path / "bank", encoder=enc,
                          tokenize=failing, config=BankBuildConfig(shard_size=2), sources=[str(path)],
                          progress=False)
    with pytest.raises(ValueError, match="unfinished build with other inputs"):
        build_memory_bank(documents=read_documents([path]), out_dir=tmp_path / "bank", encoder=enc,
                          tokenize=_tokenize, config=BankBuildConfig(shard_size=5), sources=[str(path)],
                          progress=False)


def test_bad_documents_name_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('[{"text": "ok"}]\n\n{"nope": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3"):
        list(read_documents([p]))
    p.write_text('[{"text": "ok"}]\n[{"image": "missing.png"}]\n')
    docs = list(read_documents([p]))
    assert docs[0].doc_id.endswith("bad.jsonl:1")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: cannot read image"):
        document_parts(docs[1])
    p.write_text('[{"image_tokens": [1, 2, 3, 4]}]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: document has no text"):
        document_parts(next(read_documents([p])))
    p.write_text('{"prompt": "How to fold?", "response": [{"text": "Like this."}]}\n')
    assert document_parts(next(read_documents([p]))).text == "How to fold? Like this."

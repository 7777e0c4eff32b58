"""Retriever: known neighbours, the diversity rules, query dropout, bank-row queries (§3.1)."""

from __future__ import annotations

import numpy as np
import pytest

from jam_metaseq.retrieval.bank import (BankBuildConfig, MemoryBank, build_memory_bank, document_parts,
                                        read_documents, write_memory_bank)
from jam_metaseq.retrieval.encoders import query_dropout_keep
from jam_metaseq.retrieval.retriever import (Retriever, RetrieverConfig, load_neighbours, neighbour_docs,
                                             save_neighbours, select_diverse)
from _retrieval_util import clustered_unit_vectors, tiny_encoder, write_docs


def _unit_with_cos(q: np.ndarray, cos: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector whose inner product with the unit vector q is exactly ``cos``."""
    r = rng.standard_normal(q.size)
    r -= (r @ q) * q
    r /= np.linalg.norm(r)
    return (cos * q + np.sqrt(1 - cos**2) * r).astype(np.float32)


@pytest.fixture
def planted(tmp_path):
    """A bank around q = e0 with hand-set scores; C2 is a near-duplicate of C, F a token copy of C."""
    d = 16
    rng = np.random.default_rng(0)
    q = np.zeros(d, np.float32)
    q[0] = 1.0
    vecs = {"A": q.copy(), "B": _unit_with_cos(q, 0.95, rng), "C": _unit_with_cos(q, 0.86, rng),
            "D": _unit_with_cos(q, 0.80, rng), "E": _unit_with_cos(q, 0.50, rng)}
    # C2: cos(C2, C) ~ 0.99 and score just below C's; F: other direction but C's tokens
    c2 = vecs["C"] + 0.05 * _unit_with_cos(q, 0.0, rng)
    vecs["C2"] = (c2 / np.linalg.norm(c2)).astype(np.float32)
    vecs["F"] = _unit_with_cos(q, 0.83, rng)
    names = list(vecs)
    tokens = {n: np.array([10 + i, 11 + i, 2]) for i, n in enumerate(names)}
    tokens["F"] = tokens["C"].copy()
    bank = write_memory_bank(out_dir=tmp_path / "bank", vectors=np.stack([vecs[n] for n in names]),
                             doc_ids=names, token_seqs=[tokens[n] for n in names])
    return bank, q, vecs


def _ids(docs):
    return [d.doc_id for d in docs]


def test_planted_scores_are_as_designed(planted):
    bank, q, vecs = planted
    assert float(vecs["C2"] @ q) < float(vecs["C"] @ q) and float(vecs["C2"] @ q) > 0.83
    assert float(vecs["C2"] @ vecs["C"]) > 0.95


def test_diversity_rules_skip_too_similar_and_near_duplicates(planted):
    bank, q, _ = planted
    r = Retriever(bank=bank)
    docs = r.retrieve_by_vector(q)
    # A (1.0) and B (0.95) are above 0.9; C2 duplicates C (cos 0.99); F has C's tokens
    assert _ids(docs) == ["C", "D"]
    np.testing.assert_allclose([d.score for d in docs], [0.86, 0.80], atol=1e-5)
    assert docs[0].tokens.tolist() == bank.tokens(bank.row_of("C")).tolist()
    assert _ids(r.retrieve_by_vector(q, k=3)) == ["C", "D", "E"]


def test_negative_controls_without_rules(planted):
    bank, q, _ = planted
    no_rules = Retriever(bank=bank, config=RetrieverConfig(score_threshold=None, duplicate_cosine=None, k=4))
    assert _ids(no_rules.retrieve_by_vector(q)) == ["A", "B", "C", "C2"]
    # hashes alone still drop F (a token copy of C) but keep the near-duplicate C2
    hash_only = Retriever(bank=bank, config=RetrieverConfig(duplicate_cosine=None, k=3))
    assert _ids(hash_only.retrieve_by_vector(q)) == ["C", "C2", "D"]


def test_jam_literal_threshold_rule(planted):
    bank, q, _ = planted
    r = Retriever(bank=bank, config=RetrieverConfig(threshold_rule="skip_at_or_below", duplicate_cosine=None))
    assert _ids(r.retrieve_by_vector(q)) == ["A", "B"]
    # only A and B score above 0.9 and B (cos 0.95 with A) duplicates A: the bank runs out at one
    r = Retriever(bank=bank, config=RetrieverConfig(threshold_rule="skip_at_or_below"))
    assert _ids(r.retrieve_by_vector(q)) == ["A"]


def test_retrieve_by_row_excludes_itself_and_its_copies(planted):
    bank, _, _ = planted
    r = Retriever(bank=bank, config=RetrieverConfig(score_threshold=None, duplicate_cosine=None, k=6))
    got = _ids(r.retrieve_by_id("C"))
    assert "C" not in got and "F" not in got  # F has C's tokens
    assert set(got) == {"A", "B", "C2", "D", "E"}


def test_known_nearest_neighbours_match_numpy(tmp_path):
    xb = clustered_unit_vectors(500, 24, clusters=10, spread=0.6, seed=3)
    bank = write_memory_bank(out_dir=tmp_path / "b", vectors=xb, doc_ids=[f"d{i}" for i in range(500)],
                             token_seqs=[np.array([4 + i % 50, i // 50 + 4]) for i in range(500)])
    r = Retriever(bank=bank, config=RetrieverConfig(score_threshold=None, duplicate_cosine=None, k=2))
    sims = xb @ xb.T
    np.fill_diagonal(sims, -np.inf)
    for row in range(0, 500, 37):
        assert [d.row for d in r.retrieve_by_row(row)] == np.argsort(-sims[row])[:2].tolist()


def test_expands_search_when_many_candidates_are_skipped(tmp_path):
    rng = np.random.default_rng(5)
    q = np.zeros(8, np.float32)
    q[0] = 1
    near = [_unit_with_cos(q, 0.99, rng) for _ in range(40)]  # all above the threshold
    far = [_unit_with_cos(q, 0.3, rng), _unit_with_cos(q, 0.2, rng)]
    vecs = np.stack(near + far)
    bank = write_memory_bank(out_dir=tmp_path / "b", vectors=vecs, doc_ids=[str(i) for i in range(42)],
                             token_seqs=[np.array([i + 4]) for i in range(42)])
    r = Retriever(bank=bank, config=RetrieverConfig(candidates=4, duplicate_cosine=None))
    assert _ids(r.retrieve_by_vector(q)) == ["40", "41"]


def test_select_diverse_hand_computed():
    vectors = np.eye(4, dtype=np.float32)
    hashes = np.array([1, 2, 2, 3], dtype=np.uint64)
    cfg = RetrieverConfig(k=2)
    got = select_diverse(scores=np.array([0.95, 0.8, 0.7, 0.6, 0.0]), rows=np.array([0, 1, 2, 3, -1]), k=2,
                         config=cfg, hashes=hashes, vectors=vectors)
    assert got == [(1, pytest.approx(0.8)), (3, pytest.approx(0.6))]  # 0 too similar, 2 same hash as 1
    got = select_diverse(scores=np.array([0.8, 0.6]), rows=np.array([1, 3]), k=2, config=cfg,
                         hashes=hashes, vectors=vectors, exclude_hashes=[3])
    assert [r for r, _ in got] == [1]


@pytest.fixture
def one_search_kernel():
    """Batched and one-query faiss searches on the same per-pair inner-product kernel.

    faiss scores a batch of at least ``distance_compute_blas_threshold`` queries with a BLAS matrix
    product and fewer queries pair by pair: the two round differently (~1e-7), and these banks hold
    candidates whose scores are closer than that, so their order could differ between the two paths on
    some BLAS. With the threshold above every batch, a score is the same number in both paths and the
    comparison tests the selection logic alone (see docs/TESTING.md).
    """
    import faiss

    before = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 1 << 30
    yield
    faiss.cvar.distance_compute_blas_threshold = before


def test_precomputed_neighbours_equal_per_row_retrieval(tmp_path, one_search_kernel):
    xb = clustered_unit_vectors(300, 16, clusters=6, spread=0.3, seed=9)
    toks = [np.array([4 + i % 7, 4 + i % 11]) for i in range(300)]  # repeated contents: hash rule at work
    bank = write_memory_bank(out_dir=tmp_path / "b", vectors=xb, doc_ids=[str(i) for i in range(300)],
                             token_seqs=toks)
    r = Retriever(bank=bank, config=RetrieverConfig(k=3, candidates=4))
    rows, scores = r.precompute_neighbours(batch_size=64, progress=False)
    for row in range(300):
        want = r.retrieve_by_row(row)
        assert rows[row][rows[row] >= 0].tolist() == [d.row for d in want]
    save_neighbours(bank, rows=rows, scores=scores, config=r.config, training=False)
    reloaded = MemoryBank.load(bank.path)
    got_rows, got_scores = load_neighbours(reloaded)
    np.testing.assert_array_equal(got_rows, rows)
    assert [t.tolist() for t in neighbour_docs(reloaded, got_rows, 5)] == \
        [bank.tokens(int(x)).tolist() for x in rows[5] if x >= 0]


# ---- query dropout --------------------------------------------------------------------------
@pytest.mark.parametrize("n", [5, 10, 77, 1000])
def test_query_dropout_drops_twenty_percent(n):
    rng = np.random.default_rng(n)
    fractions = [1 - query_dropout_keep(n, rate=0.2, rng=rng).mean() for _ in range(200)]
    assert all(abs(f - 0.2) <= 0.5 / n + 1e-9 for f in fractions)  # exact count, up to rounding
    assert abs(np.mean(fractions) - 0.2) <= 0.5 / n + 1e-9


def test_query_dropout_is_uniform_and_keeps_one():
    rng = np.random.default_rng(0)
    dropped = np.zeros(10)
    for _ in range(2000):
        dropped += ~query_dropout_keep(10, rate=0.2, rng=rng)
    np.testing.assert_allclose(dropped / 2000, 0.2, atol=0.04)
    assert query_dropout_keep(1, rate=0.5, rng=rng).tolist() == [True]
    with pytest.raises(ValueError):
        query_dropout_keep(3, rate=1.0, rng=rng)


def test_text_query_dropout_removes_20_percent_of_clip_tokens():
    enc = tiny_encoder()
    words = " ".join(f"w{i}" for i in range(15))
    n = len(enc.tokenizer.encode(words))
    full = enc.tokenize_texts([words])[0]
    dropped = enc.tokenize_texts([words], drop_rate=0.2, rng=np.random.default_rng(1))[0]
    n_full = int((full != 0).sum()) - 2  # minus <sot>, <eot>
    n_kept = int((dropped != 0).sum()) - 2
    assert n_full == n and n_kept == n - round(0.2 * n)
    kept = dropped[1:1 + n_kept].tolist()
    it = iter(full[1:1 + n].tolist())
    assert all(t in it for t in kept)  # an order-preserving subsequence


def test_image_query_dropout_zeroes_20_percent_of_patches():
    from PIL import Image

    enc = tiny_encoder()
    im = Image.fromarray(np.random.default_rng(0).integers(1, 255, (32, 32, 3), dtype=np.uint8))
    x = enc._pixels([im], drop_rate=0.2, rng=np.random.default_rng(3))[0]  # (3, 32, 32), 4x4 patches
    patches = x.reshape(3, 4, 8, 4, 8).permute(1, 3, 0, 2, 4).reshape(16, -1)
    zero = (patches == 0).all(dim=1)
    assert int(zero.sum()) == round(0.2 * 16)


# ---- end to end with the tiny CLIP encoder ---------------------------------------------------
@pytest.fixture(scope="module")
def clip_bank(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clipbank")
    path = write_docs(folder, 10)
    enc = tiny_encoder()
    bank = build_memory_bank(documents=read_documents([path]), out_dir=folder / "bank", encoder=enc,
                             tokenize=lambda d: np.array([4 + len(d.segments), 5, 2]) if d.doc_id == "doc3"
                             else np.array([4 + int(d.doc_id[3:]), 2]),
                             config=BankBuildConfig(shard_size=4, store_query_vectors=True),
                             sources=[str(path)], progress=False)
    docs = list(read_documents([path]))
    return bank, enc, docs


def test_encoder_matches_open_clip_directly(clip_bank):
    import torch

    bank, enc, docs = clip_bank
    d0 = document_parts(docs[0])  # text + image
    with torch.no_grad():
        t = enc.model.encode_text(enc.tokenizer([d0.text]))
        i = enc.model.encode_image(enc.preprocess(d0.images[0])[None])
    t, i = t / t.norm(), i / i.norm()
    ref = (t + i) / 2
    ref = (ref / ref.norm())[0].numpy()
    np.testing.assert_allclose(bank.vectors[0], ref, atol=1e-5)
    d2 = document_parts(docs[2])  # text only: its one embedding
    with torch.no_grad():
        t2 = enc.model.encode_text(enc.tokenizer([d2.text]))[0]
    np.testing.assert_allclose(bank.vectors[2], (t2 / t2.norm()).numpy(), atol=1e-5)


def test_exact_query_finds_its_document_and_threshold_skips_it(clip_bank):
    bank, enc, docs = clip_bank
    plain = Retriever(bank=bank, encoder=enc, config=RetrieverConfig(score_threshold=None, k=1))
    default = Retriever(bank=bank, encoder=enc)
    for j in (0, 1, 2, 4):
        p = document_parts(docs[j])
        image = p.images[0] if p.images else None
        top = plain.retrieve(p.text, image, training=False)
        assert top[0].row == j and top[0].score > 0.999
        got = default.retrieve(p.text, image, training=False)
        assert j not in [d.row for d in got] and len(got) == 2
        assert all(d.score <= 0.9 for d in got)
        # the query's own tokens are excluded even with no threshold
        got = plain.retrieve(p.text, image, training=False, query_tokens=bank.tokens(j))
        assert got[0].row != j


def test_training_retrieval_uses_dropout_reproducibly(clip_bank):
    bank, enc, docs = clip_bank
    r = Retriever(bank=bank, encoder=enc)
    p = document_parts(docs[0])
    v_eval = r.encode_query(p.text, p.images[0], training=False)
    v1 = r.encode_query(p.text, p.images[0], training=True, rng=np.random.default_rng(7))
    v2 = r.encode_query(p.text, p.images[0], training=True, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(v1, v2)
    assert not np.allclose(v1, v_eval)
    with pytest.raises(ValueError, match="rng"):
        r.encode_query(p.text, None, training=True)
    # bank-row queries in training use the stored dropout vectors
    assert bank.query_vectors is not None and not np.allclose(bank.query_vectors[0], bank.vectors[0])
    assert 0 not in [d.row for d in r.retrieve_by_row(0, training=True)]


# ---- integration helpers (training task, generator) -----------------------------------------
def test_augmenter_prefixes_neighbours_within_context(tmp_path, one_search_kernel):
    from jam_metaseq.retrieval.prefix import build_retrieval_prefix
    from jam_metaseq.retrieval.retriever import RetrievalAugmenter
    from jam_metaseq.vocab import tiny_manifest

    vocab = tiny_manifest()
    xb = clustered_unit_vectors(60, 8, clusters=3, spread=0.4, seed=4)
    toks = [np.array([vocab.text_start + i % 60, vocab.text_start + 1, vocab.eos]) for i in range(60)]
    bank = write_memory_bank(out_dir=tmp_path / "b", vectors=xb, doc_ids=[str(i) for i in range(60)],
                             token_seqs=toks, vocab=vocab)
    seq = np.array([vocab.bos] + [vocab.text_start + 5] * 6 + [vocab.eos])
    live = RetrievalAugmenter(bank_dir=bank.path, vocab=vocab, context=16)
    r = Retriever(bank=bank)
    want_docs = [d.tokens for d in r.retrieve_by_row(7, training=True)]
    tokens, is_prefix = live.augment(seq, row=7)
    assert tokens.size <= 16 and tokens[0] == vocab.bos
    assert tokens[is_prefix].tolist() == build_retrieval_prefix(want_docs, vocab=vocab, max_len=8).tolist()
    assert tokens[~is_prefix].tolist() == seq.tolist()
    rows, scores = r.precompute_neighbours(progress=False)
    save_neighbours(bank, rows=rows, scores=scores, config=r.config, training=False)
    pre = RetrievalAugmenter(bank_dir=bank.path, vocab=vocab, context=16)
    assert pre.neighbours is not None
    np.testing.assert_array_equal(pre.augment(seq, row=7)[0], tokens)
    with pytest.raises(ValueError, match="ids"):
        RetrievalAugmenter(bank_dir=bank.path, vocab=tiny_manifest(text_size=80), context=16)


def test_prompt_prefix_for_the_generator(clip_bank):
    from jam_metaseq.retrieval.retriever import retrieval_prefix_for_prompt
    from jam_metaseq.vocab import tiny_manifest

    bank, enc, docs = clip_bank
    r = Retriever(bank=bank, encoder=enc)
    prefix, got = retrieval_prefix_for_prompt(r, prompt_text="a red cat", vocab=tiny_manifest(), max_len=64)
    assert len(got) == 2
    assert prefix.tolist() == sum((d.tokens[:-1].tolist() + [2] for d in got), [])


@pytest.mark.slow
def test_default_vit_b_32_encodes_512_d_unit_vectors():
    from PIL import Image

    from jam_metaseq.retrieval.encoders import ClipDocumentEncoder, ClipEncoderConfig, QueryParts

    enc = ClipDocumentEncoder(config=ClipEncoderConfig())  # ViT-B-32, random weights
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    v = enc.encode_documents([QueryParts("a photo of a cat", [im]), QueryParts(None, [im])],
                             drop_rate=0.2, rng=np.random.default_rng(0))
    assert enc.dim == 512 and enc.patch_size == (32, 32) and v.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)

"""faiss indexes: exact search equals numpy, approximate recall@2, disk round trip (§3.1 MIPS)."""

from __future__ import annotations

import numpy as np
import pytest

from jam_metaseq.retrieval.index import (IndexConfig, build_index, default_nlist, load_index, recall_at_k,
                                         save_index, search)
from _retrieval_util import clustered_unit_vectors


@pytest.fixture(scope="module")
def data():
    xb = clustered_unit_vectors(6000, 32, clusters=60, spread=0.35, seed=1)
    rng = np.random.default_rng(2)
    xq = xb[rng.choice(len(xb), 200, replace=False)] + 0.05 * rng.standard_normal((200, 32)).astype(np.float32)
    return xb, xq.astype(np.float32)


def test_flat_equals_numpy_topk(data):
    xb, xq = data
    scores, rows = search(build_index(xb, config=IndexConfig(kind="flat")), xq, k=5)
    ref = xq @ xb.T
    ref_rows = np.argsort(-ref, axis=1)[:, :5]
    np.testing.assert_allclose(scores, np.take_along_axis(ref, ref_rows, 1), rtol=1e-5, atol=1e-5)
    # rows agree except at exact ties
    assert (rows == ref_rows).mean() > 0.99


@pytest.mark.parametrize("cfg", [IndexConfig(kind="ivf", nlist=64, nprobe=8),
                                 IndexConfig(kind="hnsw", hnsw_m=16, ef_search=64)],
                         ids=["ivf", "hnsw"])
def test_approximate_recall_at_2(data, cfg):
    xb, xq = data
    _, exact = search(build_index(xb, config=IndexConfig(kind="flat")), xq, k=2)
    _, approx = search(build_index(xb, config=cfg), xq, k=2)
    assert recall_at_k(approx, exact, k=2) >= 0.95


def test_ivf_with_one_probe_loses_recall_negative_control(data):
    """The recall test can fail: with 1 of 256 cells probed, recall drops clearly."""
    xb, xq = data
    _, exact = search(build_index(xb, config=IndexConfig(kind="flat")), xq, k=2)
    _, approx = search(build_index(xb, config=IndexConfig(kind="ivf", nlist=128, nprobe=1)), xq, k=2)
    assert recall_at_k(approx, exact, k=2) < 0.95


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, data, kind):
    xb, xq = data
    cfg = IndexConfig(kind=kind, nlist=32, nprobe=4, ef_search=32)
    index = build_index(xb, config=cfg)
    save_index(index, tmp_path / "i.faiss")
    assert not list(tmp_path.glob("*.tmp"))
    loaded = load_index(tmp_path / "i.faiss", config=cfg)
    a, b = search(index, xq, k=3), search(loaded, xq, k=3)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def test_load_applies_search_params(tmp_path, data):
    import faiss

    xb, _ = data
    save_index(build_index(xb, config=IndexConfig(kind="ivf", nlist=16, nprobe=2)), tmp_path / "i.faiss")
    loaded = load_index(tmp_path / "i.faiss", config=IndexConfig(kind="ivf", nprobe=7, use_gpu=False))
    assert faiss.downcast_index(loaded).nprobe == 7


def test_config_validation_and_defaults():
    with pytest.raises(ValueError, match="kind"):
        IndexConfig(kind="lsh")
    with pytest.raises(ValueError, match="nprobe"):
        IndexConfig(nprobe=0)
    assert default_nlist(1_000_000) == 4000
    assert default_nlist(100) == 2  # at least 39 points per centroid
    assert IndexConfig.from_dict(IndexConfig(kind="hnsw", hnsw_m=8).to_dict()) == IndexConfig(kind="hnsw", hnsw_m=8)


def test_recall_at_k_hand_computed():
    exact = np.array([[1, 2], [3, 4]])
    assert recall_at_k(np.array([[2, 1], [3, 9]]), exact, k=2) == 0.75

"""MixtureStream: proportions, epochs, and resume equals an uninterrupted run."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest

from jam_metaseq.data.binarize import binarize, open_dataset
from jam_metaseq.data.mixture import MixtureStream
from jam_metaseq.data.tokenizers import ByteTokenizer
from jam_metaseq.vocab import tiny_manifest


class ListDataset:
    """Items of given lengths; token values encode (source id, index) so items are recognisable."""

    def __init__(self, lengths, tag):
        self.sizes = np.asarray(lengths, dtype=np.int64)
        self.tag = tag

    def __len__(self):
        return self.sizes.size

    def __getitem__(self, i):
        return {"tokens": np.full(self.sizes[i], self.tag * 1000 + i, dtype=np.int64),
                "loss_mask": np.ones(self.sizes[i], dtype=bool)}


def sources():
    rng = np.random.default_rng(0)
    # text blocks are long, image-caption documents short: sample balance != token balance
    return {"text": ListDataset(rng.integers(300, 400, size=37), 1),
            "image_caption": ListDataset(rng.integers(90, 110, size=53), 2)}


def test_token_balance_is_exact():
    stream = MixtureStream(sources(), {"text": 0.5, "image_caption": 0.5}, seed=1)
    totals = {"text": 0, "image_caption": 0}
    for item in islice(stream, 2000):
        totals[item["source"]] += item["tokens"].size
        lag = abs(totals["text"] - totals["image_caption"])
        assert lag <= 400  # never more than one item apart
    share = stream.token_shares()
    assert abs(share["text"] - 0.5) < 0.002
    stream = MixtureStream(sources(), {"text": 1, "image_caption": 3}, seed=1)
    list(islice(stream, 2000))
    assert abs(stream.token_shares()["text"] - 0.25) < 0.002


def test_sample_balance_within_tolerance():
    stream = MixtureStream(sources(), {"text": 0.3, "image_caption": 0.7}, seed=2, balance="samples")
    names = [it["source"] for it in islice(stream, 4000)]
    frac = names.count("text") / len(names)
    assert abs(frac - 0.3) < 0.025  # ~3.4 standard deviations


def test_epochs_cover_every_item_and_reshuffle():
    src = sources()
    stream = MixtureStream(src, {"text": 0.5, "image_caption": 0.5}, seed=3, balance="samples")
    seen = {"text": [], "image_caption": []}
    while len(seen["text"]) < 2 * len(src["text"]):
        it = next(stream)
        seen[it["source"]].append(it["index"])
        assert int(it["tokens"][0]) % 1000 == it["index"]
    first, second = seen["text"][:37], seen["text"][37:74]
    assert sorted(first) == list(range(37)) == sorted(second)
    assert first != second  # a new permutation per epoch
    unshuffled = MixtureStream(src, {"text": 1, "image_caption": 1}, seed=3, shuffle=False)
    order = [(it["source"], it["index"]) for it in islice(unshuffled, 40)]
    for name in src:
        idx = [i for n, i in order if n == name]
        assert idx == list(range(len(idx)))
    # token balance: the first item is text (ties go to the first source), then captions catch up
    assert order[0] == ("text", 0) and order[1:4] == [("image_caption", 0), ("image_caption", 1),
                                                      ("image_caption", 2)]


@pytest.mark.parametrize("balance", ["tokens", "samples"])
def test_resume_equals_uninterrupted(balance):
    weights = {"text": 0.5, "image_caption": 0.5}
    full = MixtureStream(sources(), weights, seed=4, balance=balance)
    reference = [(it["source"], it["index"]) for it in islice(full, 300)]
    first = MixtureStream(sources(), weights, seed=4, balance=balance)
    head = [(it["source"], it["index"]) for it in islice(first, 123)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = MixtureStream(sources(), weights, seed=4, balance=balance)
    resumed.load_state_dict(state)
    tail = [(it["source"], it["index"]) for it in islice(resumed, 300 - 123)]
    assert head + tail == reference
    # negative control: a fresh stream (no state) does not continue the sequence
    fresh = MixtureStream(sources(), weights, seed=4, balance=balance)
    assert [(it["source"], it["index"]) for it in islice(fresh, 300 - 123)] != tail


def test_ranks_partition_the_single_process_stream():
    weights = {"text": 0.5, "image_caption": 0.5}
    single = [(it["source"], it["index"]) for it in islice(MixtureStream(sources(), weights, seed=5), 90)]
    per_rank = [[(it["source"], it["index"]) for it in
                 islice(MixtureStream(sources(), weights, seed=5, rank=r, world_size=3), 30)] for r in range(3)]
    assert [per_rank[t % 3][t // 3] for t in range(90)] == single
    # resume on a rank
    s = MixtureStream(sources(), weights, seed=5, rank=1, world_size=3)
    list(islice(s, 10))
    r = MixtureStream(sources(), weights, seed=5, rank=1, world_size=3)
    r.load_state_dict(s.state_dict())
    assert [(it["source"], it["index"]) for it in islice(r, 20)] == per_rank[1][10:30]


def test_state_and_argument_errors():
    with pytest.raises(ValueError, match="different sets"):
        MixtureStream(sources(), {"text": 1.0}, seed=0)
    with pytest.raises(ValueError, match="> 0"):
        MixtureStream(sources(), {"text": 1.0, "image_caption": 0.0}, seed=0)
    state = MixtureStream(sources(), {"text": 1, "image_caption": 1}, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed=0"):
        MixtureStream(sources(), {"text": 1, "image_caption": 1}, seed=9).load_state_dict(state)


def test_mixture_over_binarized_datasets(tmp_path):
    vocab = tiny_manifest(text_size=256, image_codes=32, image_grid=(2, 2), num_sentinels=4)
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps([{"text": "words " * (i + 5)}]) + "\n" for i in range(10)))
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps([{"image_tokens": [i % 32] * 4}, {"text": f"cap {i}"}]) + "\n"
                            for i in range(20)))
    for name, path in (("text", text), ("caps", caps)):
        binarize(path, out_prefix=tmp_path / name, vocab=vocab, text_tokenizer=ByteTokenizer(),
                 block_size=64, break_mode="eos", progress=False)
    stream = MixtureStream({"text": open_dataset(tmp_path / "text"), "caps": open_dataset(tmp_path / "caps")},
                           {"text": 0.5, "caps": 0.5}, seed=0)
    items = list(islice(stream, 200))
    assert all(it["tokens"].dtype == np.int64 and it["loss_mask"].all() for it in items)
    assert abs(stream.token_shares()["caps"] - 0.5) < 0.02

"""Vocabulary manifests with explicit ids (issue 23, item 5): an imported parent keeps its
tokenizer's ids, and its manifest names which reserved ids serve as <break>, the CM3 sentinels and
<eoss>. Our own manifests keep their layout and bytes; every consumer reads ids through the class."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jam_metaseq.objectives.cm3 import cm3_inverse, cm3_transform
from jam_metaseq.vocab import TokenIds, VocabManifest, tiny_manifest

# Gemma-like in miniature: pad 0, eos 1, bos 2, unk 3; reserved ids 4..9 as sentinels, <break>, <eoss>
IDS = TokenIds(size=128, bos=2, pad=0, eos=1, unk=3, text=(0, 96), image=(96, 128), break_id=8,
               sentinels=(4, 8), eoss=9)
GEMMA_LIKE = VocabManifest.imported(IDS, image_grid=(4, 8), image_tokens_per_image=32)


def test_our_manifests_keep_their_layout_and_bytes():
    d = tiny_manifest().to_dict()
    assert json.dumps(d) == (
        '{"text_size": 64, "image_codes": 32, "num_sentinels": 4, "pad_to_multiple": 8, "image_tokens_per_image": 4, '
        '"image_grid": [2, 2], "text_tokenizer": null, "version": 1, "ids": {"bos": 0, "pad": 1, "eos": 2, "unk": 3, '
        '"break": 100, "eoss": 105, "mask": 101, "text": [4, 68], "image": [68, 100], "sentinels": [101, 105], '
        '"size": 112}}')


def test_explicit_ids_round_trip_and_are_what_every_reader_sees(tmp_path):
    GEMMA_LIKE.save(tmp_path / "vocab.json")
    raw = json.loads((tmp_path / "vocab.json").read_text())
    assert raw["layout"] == "explicit" and raw["ids"]["sentinels"] == [4, 8] and raw["ids"]["break"] == 8
    v = VocabManifest.load(tmp_path / "vocab.json")
    assert v == GEMMA_LIKE
    assert (v.bos, v.pad, v.eos, v.unk, v.break_id, v.eoss, v.mask_id, v.size) == (2, 0, 1, 3, 8, 9, 4, 128)
    assert (v.text_start, v.text_end, v.image_start, v.image_end, v.num_sentinels) == (0, 96, 96, 128, 4)
    assert [v.sentinel(i) for i in range(4)] == [4, 5, 6, 7] and v.image_id(5) == 101
    ids = np.arange(12)
    assert v.is_text(ids).tolist() == [False] * 10 + [True] * 2  # its specials and reserved ids are not text
    assert v.is_sentinel(ids).tolist() == [i in (4, 5, 6, 7) for i in range(12)]
    syms = v.symbols()
    assert len(syms) == 128 and syms[:10] == ["<pad>", "</s>", "<s>", "<unk>", "<mask:0>", "<mask:1>", "<mask:2>",
                                              "<mask:3>", "<break>", "<eoss>"] and syms[96] == "<img0>"


@pytest.mark.parametrize("change,match", [
    ({"sentinels": (90, 100)}, r"sentinels \[90, 100\] overlap the image range"),
    ({"pad": 1}, "ids.pad 1 is also bos or eos"),
    ({"break_id": 5}, "ids.break 5 is inside the sentinel range"),
    ({"eoss": 100}, "ids.eoss 100 is inside the image range"),
    ({"bos": 128}, "ids.bos 128 is not an id below size 128"),
    ({"sentinels": (4, 4)}, "ids.sentinels is empty"),
    ({"extends": (96, 120)}, r"ids.extends \[96, 120\] must be"),
])
def test_explicit_ids_are_validated_by_name(change, match):
    kw = {f: getattr(IDS, f) for f in ("size", "bos", "pad", "eos", "unk", "text", "image", "break_id", "sentinels",
                                       "eoss", "extends")}
    with pytest.raises(ValueError, match=match):
        TokenIds(**{**kw, **change})


def test_a_manifest_file_missing_ids_is_refused_naming_them(tmp_path):
    d = GEMMA_LIKE.to_dict()
    del d["ids"]["eoss"], d["ids"]["break"]
    (tmp_path / "v.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"v.json: ids has no break, eoss"):
        VocabManifest.load(tmp_path / "v.json")
    with pytest.raises(ValueError, match="differ from the explicit ids"):
        VocabManifest(text_size=10, image_codes=32, num_sentinels=4, image_grid=(4, 8), image_tokens_per_image=32,
                      explicit_ids=IDS)


def test_cm3_uses_the_named_sentinels_and_eoss():
    """The CM3 objective on a Gemma-like vocabulary: the moved spans are framed by its reserved ids
    <mask:i> = 4 + i and <eoss> = 9, and the inverse puts every span back."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, 96, size=40)
    out = cm3_transform(tokens, rng, vocab=GEMMA_LIKE, mode="fixed", num_spans=3, max_spans=4)
    assert sorted(out[GEMMA_LIKE.is_sentinel(out)].tolist()) == [4, 4, 5, 5, 6, 6] and (out == 9).sum() == 3
    assert np.array_equal(cm3_inverse(out, vocab=GEMMA_LIKE), tokens)
    with pytest.raises(ValueError, match="already holds CM3 sentinel"):
        cm3_transform(np.array([10, 9, 11]), rng, vocab=GEMMA_LIKE, max_spans=4)


def test_host_dictionary_puts_the_specials_where_the_manifest_says():
    pytest.importorskip("fairseq")
    from fairseq.data import Dictionary

    from jam_metaseq.hosts.common import host_dictionary

    d = host_dictionary(Dictionary, GEMMA_LIKE)
    assert (len(d), d.bos(), d.pad(), d.eos(), d.unk()) == (128, 2, 0, 1, 3)
    assert d.index("<break>") == 8 and d.index("<mask:0>") == 4 and d[96] == "<img0>"
    ours = host_dictionary(Dictionary, tiny_manifest())
    assert (ours.bos(), ours.pad(), ours.eos(), ours.unk(), len(ours)) == (0, 1, 2, 3, 112)


def test_the_gemma_liquid_manifest_of_the_docs_is_valid():
    """docs/FAMILIES.md's manifest for Gemma-7B + Liquid-7B reads as the ids it describes."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "FAMILIES.md").read_text()
    block = text.split("```json", 1)[1].split("```", 1)[0]
    v = VocabManifest.from_dict(json.loads(block), source="docs/FAMILIES.md")
    assert (v.size, v.pad, v.eos, v.bos, v.mask_id, v.num_sentinels, v.break_id, v.eoss) == \
        (264192, 0, 1, 2, 7, 16, 23, 24)
    assert (v.image_start, v.image_end, v.explicit_ids.extends) == (256000, 264192, (256000, 264192))

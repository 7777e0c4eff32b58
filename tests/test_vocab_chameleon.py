"""A Chameleon parent's vocabulary as it is (issue 24, item 2): image codes at ids in no code order
(``TokenIds.image_map``), an image framed by two different ids (``<racm3:break>`` ... ``<eoss>``:
``boi`` / ``eoi``), reserved ids as the CM3 sentinels, all read from the config's
``vocabulary_map`` (``hf_families.chameleon.manifest_from_hf``). The reference for the code <-> id
map is ``transformers``' own ``ChameleonImageVocabularyMapping``. Every consumer reads the map
through ``VocabManifest``: binarization and its inverse, the CM3 objective (no span crosses a
frame), the decoding state machine and the answer's segments, the HF reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jam_metaseq.data.documents import detokenize_document, image_frames, tokenize_document
from jam_metaseq.generation.answer import ImageSegment, TextSegment, split_segments
from jam_metaseq.generation.state import CLOSE, IMAGE, TEXT, MixedModalRules, MixedModalState
from jam_metaseq.models.hf_families import chameleon
from jam_metaseq.objectives.cm3 import cm3_inverse, cm3_transform
from jam_metaseq.vocab import VocabManifest

V, N_CODES = 128, 8
_PERM = [5, 2, 7, 0, 3, 6, 1, 4]
"""Code c sits at id 4 + _PERM[c]: a permutation, as Chameleon's IMGIMG entries are in BPE order."""


def _name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def vocabulary_map() -> dict[str, int]:
    """A Chameleon-like ``vocabulary_map`` in miniature: specials 0-3, eight image codes at 4-11 in
    permuted order, ``<eoss>`` 12 (end of image), ``<racm3:break>`` 13 (begin), ``<reserved*>``
    from 14 to 40 (``<reserved{id - 4}>`` as in the released files), text pieces after."""
    vm = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<eoss>": 12, "<racm3:break>": 13}
    vm.update({_name(c): 4 + _PERM[c] for c in range(N_CODES)})
    vm.update({f"<reserved{i - 4:05d}>": i for i in range(14, 41)})
    vm.update({f"t{i}": i for i in range(41, V)})
    return vm


HF_CONFIG = {"model_type": "chameleon", "vocab_size": V, "vocabulary_map": vocabulary_map(),
             "vq_config": {"resolution": 8, "channel_multiplier": [1, 2, 2]}}  # a 2 x 2 grid
CHAM = chameleon.manifest_from_hf(HF_CONFIG, first_sentinel="<reserved00016>", num_sentinels=4)


class Identity:
    """A text tokenizer whose pieces are ids 41.. of the map (ids as they are)."""

    vocab_size = V

    def encode(self, text: str) -> list[int]:
        return [41 + ord(c) % (V - 41) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i - 41 + 97) for i in ids)


def test_the_manifest_is_read_from_the_vocabulary_map_and_round_trips(tmp_path):
    x = CHAM.explicit_ids
    assert (CHAM.bos, CHAM.pad, CHAM.eos, CHAM.unk) == (0, 1, 2, 3)
    assert (CHAM.boi, CHAM.eoi, CHAM.break_id) == (13, 12, 13)
    assert list(CHAM.sentinel_range) == [20, 21, 22, 23] and CHAM.eoss == 24  # <reserved00016> = id 20
    assert (CHAM.image_start, CHAM.image_end, CHAM.image_codes, CHAM.image_grid) == (4, 12, 8, (2, 2))
    assert x.image_map == tuple(4 + p for p in _PERM)
    d = CHAM.to_dict()
    assert d["layout"] == "explicit" and "image" not in d["ids"] and d["ids"]["eoi"] == 12
    CHAM.save(tmp_path / "vocab.json")
    assert VocabManifest.load(tmp_path / "vocab.json") == CHAM
    assert json.loads((tmp_path / "vocab.json").read_text())["ids"]["image_map"] == list(x.image_map)


def test_code_to_id_map_is_transformers_own():
    transformers = pytest.importorskip("transformers")
    ref = transformers.models.chameleon.modeling_chameleon.ChameleonImageVocabularyMapping(vocabulary_map())
    codes = np.arange(N_CODES)
    assert [int(i) for i in CHAM.image_id(codes)] == [ref.img2bpe[c] for c in range(N_CODES)]
    ids = torch.tensor(sorted(ref.bpe2img))
    assert CHAM.image_code(ids).tolist() == [ref.bpe2img[int(i)] for i in ids]
    assert all(CHAM.image_code(CHAM.image_id(c)) == c for c in range(N_CODES))  # ints too
    assert chameleon.image_code_of("IMGIMGBAZ") == 10


def test_ids_are_classified_once():
    ids = np.arange(V)
    img, text, sent = CHAM.is_image(ids), CHAM.is_text(ids), CHAM.is_sentinel(ids)
    assert ids[img].tolist() == list(range(4, 12))
    assert not (img & text).any() and not (sent & text).any()
    assert not text[[0, 1, 2, 3, 12, 13, 24]].any() and text[41:].all()


@pytest.mark.parametrize("change, match", [
    (dict(first_sentinel="<reserved00035>"), "is not a reserved token"),
    (dict(first_sentinel="<reserved99999>"), "vocabulary_map has no '<reserved99999>'"),
])
def test_a_manifest_that_cannot_be_read_names_the_entry(change, match):
    with pytest.raises(ValueError, match=match):
        chameleon.manifest_from_hf(HF_CONFIG, **{"first_sentinel": "<reserved00016>", "num_sentinels": 4, **change})
    broken = {**HF_CONFIG, "vocabulary_map": {k: v for k, v in vocabulary_map().items() if k != "<racm3:break>"}}
    with pytest.raises(ValueError, match="no '<racm3:break>'"):
        chameleon.manifest_from_hf(broken)


def test_binarization_frames_images_with_begin_and_end_and_inverts():
    doc = {"segments": [{"text": "ab"}, {"image_tokens": [3, 0, 7, 1]}, {"text": "c"}]}
    tokens, _ = tokenize_document(doc, vocab=CHAM, text_tokenizer=Identity())
    i = tokens.tolist().index(13)
    assert tokens[i:i + 6].tolist() == [13, 4 + _PERM[3], 4 + _PERM[0], 4 + _PERM[7], 4 + _PERM[1], 12]
    assert image_frames(tokens, vocab=CHAM) == [(i, i + 5)]
    back = detokenize_document(tokens, vocab=CHAM, text_tokenizer=Identity())
    assert back[1] == {"image_tokens": [3, 0, 7, 1]}
    with pytest.raises(ValueError, match="unclosed image"):
        image_frames(np.array([13, 4, 5]), vocab=CHAM)


def test_cm3_spans_never_cross_an_image_frame():
    doc = {"segments": [{"text": "abcdefgh"}, {"image_tokens": [0, 1, 2, 3]}, {"text": "ijklmnop"}]}
    tokens, _ = tokenize_document(doc, vocab=CHAM, text_tokenizer=Identity())
    for seed in range(30):
        out = cm3_transform(tokens, np.random.default_rng(seed), vocab=CHAM, mode="fixed", num_spans=2, max_spans=4)
        assert np.array_equal(cm3_inverse(out, vocab=CHAM), tokens)
        sent = np.flatnonzero(CHAM.is_sentinel(out))
        tail = out[sent[len(sent) // 2]:]  # <mask:i> span <eoss>, for every moved span
        assert len(sent) and not CHAM.is_frame(tail).any(), (seed, out)
        assert (out == 13).sum() == 1 and (out == 12).sum() == 1


def test_decoding_opens_with_begin_draws_image_ids_only_and_forces_end():
    """Text until ``boi``, then exactly tokens-per-image ids of the map (no text, no frame), the end
    id forced, back to text; the answer's image holds the codes the map gives."""
    rules = MixedModalRules.from_vocab(CHAM, max_new_tokens=20)
    assert (rules.break_id, rules.close_id) == (13, 12)
    st = MixedModalState(rules, [[CHAM.bos, 50]])
    allowed = st.allowed()[0]
    assert allowed[13] and allowed[50] and not allowed[12] and not allowed[4:12].any() and not allowed[20:25].any()
    img = [4 + _PERM[c] for c in (1, 2, 3, 0)]
    script, modes = [50, 13, *img, 12, 60, CHAM.eos], []
    for tok in script:
        ok = st.allowed()[0]
        if int(st.mode[0]) == IMAGE:
            assert ok.nonzero().flatten().tolist() == list(range(4, 12))
        assert ok[tok], (tok, int(st.mode[0]))
        st.advance(torch.tensor([tok]))
        modes.append(int(st.mode[0]))
        if modes[-1] == CLOSE:
            assert st.forced().tolist() == [12]
    assert modes[:7] == [TEXT, IMAGE, IMAGE, IMAGE, IMAGE, CLOSE, TEXT]
    segs = split_segments(script, vocab=CHAM)
    assert isinstance(segs[0], TextSegment) and isinstance(segs[1], ImageSegment)
    assert segs[1].codes == [[1, 2], [3, 0]] and segs[1].complete


def test_a_text_llm_transplants_into_the_chameleon_vocabulary_by_role():
    """A Llama-like LLM (its text ids, then our layout: ``after_text``) re-expressed in the Chameleon
    vocabulary: text ids copied where the bytes match, composed from pieces where not; specials,
    image begin/end, ``<eoss>``, sentinels and image codes (code c to code c) from the ids of the same
    role; the reserved ids nobody uses get the mean of the text rows."""
    from jam_metaseq.vocab_transplant import plan_rows, plan_text, transplant_rows

    old = VocabManifest.after_text(40, specials={"bos": 0, "pad": 1, "eos": 2, "unk": 3}, image_codes=N_CODES,
                                   num_sentinels=4)
    letters = [bytes([c]) for c in range(ord("a"), ord("a") + 26)]
    old_tokens = ["<s>", "<pad>", "</s>", "<unk>", *letters, *(letters[i] + letters[i + 1] for i in range(10))]
    by_id = {i: n for n, i in vocabulary_map().items()}
    new_tokens = [by_id[i] if i < 41 else (letters[i % 26] if i % 2 else letters[i % 26] * 3) for i in range(V)]
    plan = plan_rows(plan_text(old_tokens, new_tokens), old=old, new=CHAM)
    src = plan.source
    assert [int(src[getattr(CHAM, n)]) for n in ("bos", "pad", "eos", "unk")] == [0, 1, 2, 3]
    assert (int(src[CHAM.boi]), int(src[CHAM.eoi]), int(src[CHAM.eoss])) == (old.break_id, old.break_id, old.eoss)
    assert src[CHAM.sentinel_start:CHAM.sentinel_end].tolist() == list(old.sentinel_range)
    assert [int(src[CHAM.image_id(c)]) for c in range(N_CODES)] == [old.image_id(c) for c in range(N_CODES)]
    assert int(src[43]) == old_tokens.index(letters[43 % 26])  # copied: the same bytes
    assert int(src[42]) == -1 and plan.text.pieces[42]  # composed: b"qqq" from pieces
    rows = torch.randn(old.size, 6)
    out = transplant_rows(rows, plan, rule="mean")
    assert torch.equal(out[CHAM.eoss], rows[old.eoss]) and torch.equal(out[CHAM.image_id(3)], rows[old.image_id(3)])
    text_mean = rows[old.text_start:old.text_end].mean(0)  # vocab_rows.text_mean: the text range
    torch.testing.assert_close(out[30], text_mean)  # <reserved00026>: nobody's role
    torch.testing.assert_close(out[42], rows[list(plan.text.pieces[42])].mean(0))  # old text ids are its rows


def test_the_llama2_manifest_of_the_anole_recipe_is_valid():
    """docs/FAMILIES.md's Llama-2 manifest (the Llama-2-7B + Anole-7B recipe) reads as the ids it
    describes: Llama-2's 32,000 ids as they are, its <unk> as pad, the rows it lacks added."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "FAMILIES.md").read_text()
    block = text.split("cat > llama-2-7b/vocab.json <<'JSON'", 1)[1].split("JSON", 1)[0]
    v = VocabManifest.from_dict(json.loads(block), source="docs/FAMILIES.md")
    assert (v.bos, v.eos, v.pad, v.unk, v.text_size, v.size) == (1, 2, 0, 0, 32000, 40216)
    assert v.explicit_ids.extends == (32000, 40216) and (v.image_codes, v.num_sentinels) == (8192, 16)


def test_the_manifest_is_stated_back_as_a_vocabulary_map():
    """``vocab_to_hf`` (what ``convert --to hf`` writes) states the manifest in the config's own
    terms: read back, it is the same manifest, and it names the image codes as transformers does."""
    vm = chameleon.vocab_to_hf(CHAM)["vocabulary_map"]
    assert {k: v for k, v in vm.items() if k.startswith("IMGIMG")} == \
        {k: v for k, v in vocabulary_map().items() if k.startswith("IMGIMG")}
    again = chameleon.manifest_from_hf({**HF_CONFIG, "vocabulary_map": vm}, first_sentinel="<reserved00016>",
                                       num_sentinels=4)
    assert again == CHAM
    assert chameleon.vocab_to_hf(VocabManifest(text_size=10)) == {}  # not a Chameleon-format manifest

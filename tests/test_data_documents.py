"""Text tokenizers, the JSONL document format and its validation, instruction-data converters."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from hypothesis import given, settings
from hypothesis import strategies as st

from jam_metaseq.data.documents import (
    DataReport, DocumentError, detokenize_document, iter_jsonl, tokenize_document)
from jam_metaseq.data.instruct import (
    fit_document, lima_to_document, make_transform, rewrite_this_article, wikihow_to_document)
from jam_metaseq.data.tokenizers import (
    ByteTokenizer, load_text_tokenizer, train_bpe, train_sentencepiece)
from jam_metaseq.vocab import tiny_manifest

V = tiny_manifest(text_size=256, image_codes=32, image_grid=(2, 2), num_sentinels=4)
BYTES = ByteTokenizer()
BRK, EOS = V.break_id, V.eos
TEXTS = [f"the quick brown fox number {i} jumps over the lazy dog" for i in range(100)]


def txt(s: str) -> list[int]:
    return [V.text_start + x for x in s.encode()]


class MeanColourTokenizer:
    """A small deterministic image tokenizer: code = (mean of each 2x2 quadrant's red) // 8."""

    grid = (2, 2)

    def encode_images(self, images):
        out = []
        for im in images:
            a = np.asarray(im.resize((4, 4), Image.NEAREST), dtype=np.int64)[..., 0]  # (4, 4) red channel
            q = a.reshape(2, 2, 2, 2).mean(axis=(1, 3)).astype(np.int64) // 8  # (2, 2) in [0, 32)
            out.append(q)
        return np.stack(out)


# ---- tokenizers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    spm_path = train_sentencepiece(TEXTS, out_prefix=d / "sp", vocab_size=60)
    bpe_path = train_bpe(TEXTS, out_path=d / "bpe.json", vocab_size=300)
    return spm_path, bpe_path


def test_trained_tokenizers_round_trip(trained):
    spm_path, bpe_path = trained
    for spec, size in ((spm_path, 60), (f"spm:{spm_path}", 60), (bpe_path, 300), (f"bpe:{bpe_path}", 300)):
        tok = load_text_tokenizer(spec)
        assert tok.vocab_size == size
        ids = tok.encode("the lazy fox number 12")
        assert ids and all(0 <= i < size for i in ids)
        assert tok.decode(ids) == "the lazy fox number 12"
        assert load_text_tokenizer(tok.spec).encode("the dog") == tok.encode("the dog")
    bpe = load_text_tokenizer(bpe_path)
    assert bpe.decode(bpe.encode("naïve café ☕")) == "naïve café ☕"  # byte-level: no unknowns


def test_tokenizer_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot tell"):
        load_text_tokenizer(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_text_tokenizer(tmp_path / "missing.model")
    assert load_text_tokenizer("bytes").encode("hé") == [104, 195, 169]


# ---- serialisation -----------------------------------------------------------------------------
def test_tokenize_document_layout():
    doc = [{"text": "hi"}, {"image_tokens": [0, 1, 2, 31]}, {"text": "!"}]
    tokens, mask = tokenize_document(doc, vocab=V, text_tokenizer=BYTES)
    img = [V.image_start + c for c in (0, 1, 2, 31)]
    assert tokens.tolist() == txt("hi") + [BRK] + img + [BRK] + txt("!") + [EOS]
    assert tokens.dtype == np.int64 and mask.all() and mask.shape == tokens.shape


def test_instruction_document_loss_mask():
    doc = {"prompt": "Q?", "response": [{"text": "A"}, {"image_tokens": [3, 3, 3, 3]}]}
    tokens, mask = tokenize_document(doc, vocab=V, text_tokenizer=BYTES)
    assert tokens.tolist() == txt("Q?") + txt("A") + [BRK] + [V.image_start + 3] * 4 + [BRK, EOS]
    assert mask.tolist() == [False, False] + [True] * 8
    _, mask_all = tokenize_document(doc, vocab=V, text_tokenizer=BYTES, response_loss_only=False)
    assert mask_all.all()
    # segments object form equals the list form
    t1, _ = tokenize_document({"segments": [{"text": "x"}], "id": 7}, vocab=V, text_tokenizer=BYTES)
    assert t1.tolist() == txt("x") + [EOS]


def test_image_files_go_through_the_image_tokenizer(tmp_path):
    red = np.zeros((8, 8, 3), np.uint8)
    red[:4, :4, 0] = 255  # top-left quadrant bright
    Image.fromarray(red).save(tmp_path / "a.png")
    doc = [{"image": "a.png"}, {"text": "x"}]
    tokens, _ = tokenize_document(doc, vocab=V, text_tokenizer=BYTES, image_tokenizer=MeanColourTokenizer(),
                                  base_dir=tmp_path)
    assert tokens.tolist() == [BRK, V.image_start + 31, V.image_start, V.image_start, V.image_start, BRK] \
        + txt("x") + [EOS]
    with pytest.raises(DocumentError, match="no image tokenizer"):
        tokenize_document(doc, vocab=V, text_tokenizer=BYTES, base_dir=tmp_path)


segment = st.one_of(
    st.builds(lambda t: {"text": t}, st.text(min_size=1, max_size=20)),
    st.builds(lambda c: {"image_tokens": c}, st.lists(st.integers(0, 31), min_size=4, max_size=4)))


def _merge_text(segs):
    out = []
    for s in segs:
        if out and "text" in s and "text" in out[-1]:
            out[-1] = {"text": out[-1]["text"] + s["text"]}
        else:
            out.append(dict(s))
    return out


@settings(max_examples=150, deadline=None)
@given(segs=st.lists(segment, min_size=1, max_size=6))
def test_serialisation_round_trip(segs):
    tokens, mask = tokenize_document(segs, vocab=V, text_tokenizer=BYTES)
    assert tokens[-1] == EOS and mask.all()
    n_img = sum("image_tokens" in s for s in segs)
    assert (tokens == BRK).sum() == 2 * n_img and V.is_image(tokens).sum() == 4 * n_img
    assert detokenize_document(tokens, vocab=V, text_tokenizer=BYTES) == _merge_text(segs)


def test_sentencepiece_document_round_trip(trained):
    spm = load_text_tokenizer(trained[0])
    doc = [{"text": "the lazy dog"}, {"image_tokens": [9, 8, 7, 6]}, {"text": "jumps over the fox"}]
    tokens, _ = tokenize_document(doc, vocab=V, text_tokenizer=spm)
    assert V.is_text(tokens[:-1][tokens[:-1] != BRK][:3]).all()
    assert detokenize_document(tokens, vocab=V, text_tokenizer=spm) == doc
    small = tiny_manifest(text_size=16, image_codes=32, image_grid=(2, 2), num_sentinels=4)
    with pytest.raises(DocumentError, match="text_size 16"):
        tokenize_document(doc, vocab=small, text_tokenizer=spm)


# ---- validation: every error names file:line and its reason --------------------------------------
BAD_LINES = {
    "bad_json": '[{"text": "a"}',
    "bad_schema": '{"title": "x"}',
    "bad_segment": '[{"text": "a", "image": "b.png"}]',
    "image_token_count": '[{"image_tokens": [1, 2, 3]}]',
    "image_code_range": '[{"image_tokens": [1, 2, 3, 32]}]',
    "image_missing": '[{"image": "nope.png"}]',
    "empty": '[{"text": ""}]',
    "too_long": json.dumps([{"text": "x" * 50}]),
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_each_validation_error_names_file_and_line(tmp_path, reason):
    path = tmp_path / "data.jsonl"
    path.write_text('[{"text": "ok"}]\n\n' + BAD_LINES[reason] + "\n")
    with pytest.raises(DocumentError) as info:
        list(iter_jsonl(path, vocab=V, text_tokenizer=BYTES, max_tokens=20))
    assert info.value.reason == reason
    assert str(info.value).startswith(f"{path}:3: ")


def test_skip_counts_every_bad_line(tmp_path):
    path = tmp_path / "data.jsonl"
    good = ['[{"text": "one"}]', '{"prompt": "q", "response": [{"image_tokens": [0, 0, 0, 0]}]}']
    path.write_text("\n".join(good + list(BAD_LINES.values())) + "\n")
    report = DataReport()
    recs = list(iter_jsonl(path, vocab=V, text_tokenizer=BYTES, max_tokens=20, on_error="skip", report=report))
    assert [r.line for r in recs] == [1, 2]
    assert dict(report.skipped) == {k: 1 for k in BAD_LINES}
    assert report.documents == 2 and report.lines == 2 + len(BAD_LINES)
    assert report.images == 1 and report.image_tokens == 4 and report.text_tokens == 4
    assert report.special_tokens == 2 + 2  # two <eos>, two <break>
    assert report.first_errors[0].startswith(f"{path}:3:")


# ---- instruction data ----------------------------------------------------------------------------
def test_wikihow_conversion():
    art = {"title": "How to Fold a Shirt?", "segments": [
        {"text": "This article shows how. In this article we fold."},
        {"image_tokens": [1, 1, 1, 1]}, {"text": "Step 1."}, {"image_tokens": [2, 2, 2, 2]},
        {"image_tokens": [3, 3, 3, 3]}, {"text": "Step 2."}, {"image_tokens": [4, 4, 4, 4]}]}
    doc = wikihow_to_document(art, max_images=3)
    assert doc["prompt"] == "How to Fold a Shirt?\n\n"
    assert doc["response"][0]["text"] == "The following answer shows how. In the following answer we fold."
    imgs = [s["image_tokens"][0] for s in doc["response"] if "image_tokens" in s]
    assert imgs == [1, 2, 3]
    assert doc["response"][-1] == {"text": "Step 2."}
    assert rewrite_this_article("Thistle article. This articles") == "Thistle article. This articles"


def test_lima_conversion():
    assert lima_to_document({"conversations": ["Hi?", "Hello.", "more"], "source": "x"}) == \
        {"prompt": "Hi?\n\n", "response": [{"text": "Hello."}]}
    with pytest.raises(DocumentError):
        lima_to_document({"conversations": ["only one"]})


def test_fit_document_rule():
    # prompt 2 + eos 1 = 3; text "aa bb cc " = 9; image 6; budget 20
    doc = {"prompt": "Q?", "response": [{"text": "aa bb"}, {"image_tokens": [0] * 4}, {"text": "cc dd ee ff"}]}
    fitted = fit_document(doc, vocab=V, text_tokenizer=BYTES, max_tokens=20)
    # 3 + 5 + 6 = 14; "cc dd" (5) fits -> 19; "cc dd ee" (8) does not
    assert fitted["response"] == [{"text": "aa bb"}, {"image_tokens": [0] * 4}, {"text": "cc dd"}]
    tokens, _ = tokenize_document(fitted, vocab=V, text_tokenizer=BYTES, max_tokens=20)
    assert tokens.size == 19
    # an image that does not fit is dropped, never cut; later segments go too
    fitted = fit_document(doc, vocab=V, text_tokenizer=BYTES, max_tokens=12)
    assert fitted["response"] == [{"text": "aa bb"}]
    # fits already: unchanged object
    assert fit_document(doc, vocab=V, text_tokenizer=BYTES, max_tokens=100) is doc
    with pytest.raises(DocumentError, match="prompt alone"):
        fit_document(doc, vocab=V, text_tokenizer=BYTES, max_tokens=2)


def test_make_transform_through_iter_jsonl(tmp_path):
    path = tmp_path / "wh.jsonl"
    art = {"title": "How?", "segments": [{"text": "This article " + "word " * 40}, {"image_tokens": [1] * 4}]}
    path.write_text(json.dumps(art) + "\n")
    tf = make_transform("wikihow", vocab=V, text_tokenizer=BYTES, max_tokens=64)
    (rec,) = list(iter_jsonl(path, vocab=V, text_tokenizer=BYTES, transform=tf, max_tokens=64))
    assert rec.tokens.size <= 64 and rec.tokens[-1] == EOS
    assert not rec.loss_mask[:6].any() and rec.loss_mask[6:].all()  # "How?\n\n" is the prompt
    assert make_transform("plain", vocab=V, text_tokenizer=BYTES) is None

"""Conversation documents (issue 25 item 1): the conversation tokens of the vocabulary manifest and
the rows a checkpoint gains for them, the ``{"turns": [...]}`` format, its loss mask (assistant
turns only), the fit rule for long conversations and LIMA with all its turns."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jam_metaseq.data.documents import (
    DocumentError, detokenize_conversation, iter_jsonl, tokenize_document, validate_document)
from jam_metaseq.data.instruct import fit_conversation, fit_turns, lima_to_document, make_transform
from jam_metaseq.data.tokenizers import ByteTokenizer
from jam_metaseq.models import build_model, preset
from jam_metaseq.vocab import VocabManifest, tiny_manifest
from jam_metaseq.vocab_rows import added_ids, extend_rows, extend_state_dict, rows_record

V = tiny_manifest(text_size=256, image_codes=32, image_grid=(2, 2), num_sentinels=4, conversation_tokens=True)
V_OLD = tiny_manifest(text_size=256, image_codes=32, image_grid=(2, 2), num_sentinels=4)
BYTES = ByteTokenizer()
IMG = V.image_tokens_per_image + 2


# ---- the manifest -------------------------------------------------------------------------------
def test_conversation_tokens_follow_eoss_and_keep_every_other_id():
    assert (V.user_id, V.assistant_id, V.eot) == (V.eoss + 1, V.eoss + 2, V.eoss + 3)
    assert V.num_used == V_OLD.num_used + 3
    sym = V.symbols()
    assert sym[V.user_id:V.eot + 1] == ["<user>", "<assistant>", "<eot>"]
    assert sym[:V_OLD.num_used] == V_OLD.symbols()[:V_OLD.num_used]
    assert VocabManifest.from_dict(json.loads(json.dumps(V.to_dict()))) == V
    assert V.to_dict()["ids"]["eot"] == V.eot
    # a manifest without them serialises as before (recorded checkpoint goldens hash it)
    assert "conversation_tokens" not in V_OLD.to_dict() and "eot" not in V_OLD.to_dict()["ids"]
    with pytest.raises(ValueError, match="no <eot> token.*--conversation-tokens"):
        V_OLD.eot
    with pytest.raises(ValueError, match="unknown conversation role"):
        V.role_id("system")


def test_added_rows_start_at_the_text_mean_and_leave_the_model_unchanged_on_old_ids():
    big_old = tiny_manifest(text_size=60)
    big_new = tiny_manifest(text_size=60, conversation_tokens=True)
    assert big_new.size == big_old.size + 8  # 102 used -> 105: the rows grow by one multiple of 8
    ids = added_ids(big_old, big_new)
    assert list(ids) == list(range(big_old.num_used, big_new.size))
    torch.manual_seed(0)
    old_model = build_model(preset("tiny", vocab_size=big_old.size)).eval()
    state = extend_state_dict(old_model.state_dict(), old=big_old, new=big_new)
    emb = state["decoder.embed_tokens.weight"]
    assert state["decoder.output_projection.weight"] is emb  # tied stays tied
    text_mean = old_model.decoder.embed_tokens.weight[big_old.text_start:big_old.text_end].mean(0)
    torch.testing.assert_close(emb[big_new.eot], text_mean)
    assert torch.equal(emb[ids.start:], text_mean.expand(len(ids), -1))
    new_model = build_model(preset("tiny", vocab_size=big_new.size)).eval()
    new_model.load_state_dict(state, strict=True)
    tokens = torch.randint(big_old.text_start, big_old.text_end, (2, 9))
    with torch.no_grad():
        a, b = old_model(tokens), new_model(tokens)
    torch.testing.assert_close(b[..., :big_old.num_used], a[..., :big_old.num_used])
    # the new token's logit is the average text logit: no outlier probability at the start
    h = new_model.extract_features(tokens)
    torch.testing.assert_close(b[..., big_new.eot], (h @ emb[big_old.text_start:big_old.text_end].T).mean(-1))
    rec = rows_record(big_old, big_new)
    assert rec["tokens"] == {"<user>": big_new.user_id, "<assistant>": big_new.assistant_id, "<eot>": big_new.eot}
    assert rec["rows"] == [big_old.num_used, big_new.size] and rec["init"] == "text_mean"


def test_added_rows_refuse_a_vocabulary_that_moves_ids():
    other = tiny_manifest(text_size=255, conversation_tokens=True)
    with pytest.raises(ValueError, match="does not extend.*text_size"):
        added_ids(V_OLD, other)
    with pytest.raises(ValueError, match=rf"expected \({V_OLD.size}, E\)"):
        extend_rows(torch.zeros(5, 4), old=V_OLD, new=V)
    with pytest.raises(ValueError, match="unknown row init rule"):
        extend_rows(torch.zeros(V_OLD.size, 4), old=V_OLD, new=V, rule="random")


# ---- the format and its loss ----------------------------------------------------------------------
def txt(s: str) -> list[int]:
    return [V.text_start + x for x in s.encode()]


def test_conversation_layout_by_hand():
    doc = {"turns": [{"role": "user", "segments": [{"text": "hi"}, {"image_tokens": [0, 1, 2, 3]}]},
                     {"role": "assistant", "segments": [{"text": "ok"}]},
                     {"role": "user", "segments": [{"text": "?"}]},
                     {"role": "assistant", "segments": [{"image_tokens": [4, 5, 6, 7]}]}]}
    tokens, mask = tokenize_document(doc, vocab=V, text_tokenizer=BYTES)
    img = lambda cs: [V.break_id, *(V.image_start + c for c in cs), V.break_id]  # noqa: E731
    want = ([V.user_id, *txt("hi"), *img([0, 1, 2, 3]), V.eot, V.assistant_id, *txt("ok"), V.eot,
             V.user_id, *txt("?"), V.eot, V.assistant_id, *img([4, 5, 6, 7]), V.eot, V.eos])
    assert tokens.tolist() == want
    trained = [i for i, m in enumerate(mask) if m]
    first = want.index(V.assistant_id)
    second = len(want) - 1 - want[::-1].index(V.assistant_id)
    assert trained == [first + 1, first + 2, first + 3] + list(range(second + 1, second + 8))
    _, all_mask = tokenize_document(doc, vocab=V, text_tokenizer=BYTES, response_loss_only=False)
    assert all_mask.all()
    back = detokenize_conversation(tokens, vocab=V, text_tokenizer=BYTES)
    assert back == doc


segment = st.one_of(
    st.builds(lambda s: {"text": s}, st.text(alphabet="abc <>|\n", min_size=0, max_size=6)),
    st.builds(lambda c: {"image_tokens": c}, st.lists(st.integers(0, 31), min_size=4, max_size=4)))
conversations = st.integers(1, 6).flatmap(lambda n: st.lists(
    st.lists(segment, min_size=1, max_size=3), min_size=n, max_size=n)).map(
    lambda turns: {"turns": [{"role": ("user", "assistant")[i % 2], "segments": s} for i, s in enumerate(turns)]}
).filter(lambda d: any(s != {"text": ""} for t in d["turns"] for s in t["segments"]))  # else an empty document


def regions(tokens: list[int]) -> list[str]:
    """Independent reading of the token stream: which role each token belongs to, ``frame`` for
    the role tokens and the closing <eos> (the ids of role/eot tokens never occur inside segments)."""
    out, role = [], None
    for t in tokens:
        if t in (V.user_id, V.assistant_id):
            role = "user" if t == V.user_id else "assistant"
            out.append("frame")
        elif t == V.eot:
            out.append(role)
            role = None
        else:
            out.append(role or "frame")
    return out


@settings(max_examples=150, deadline=None)
@given(conversations)
def test_no_user_token_carries_loss_and_every_assistant_token_does(doc):
    tokens, mask = tokenize_document(doc, vocab=V, text_tokenizer=BYTES)
    where = regions(tokens.tolist())
    assert len(where) == len(mask)
    for w, m in zip(where, mask):
        assert m == (w == "assistant"), (w, m)
    assert sum(w == "frame" for w in where) == len(doc["turns"]) + 1  # one role token per turn + <eos>
    back = detokenize_conversation(tokens, vocab=V, text_tokenizer=BYTES)
    assert tokenize_document(back, vocab=V, text_tokenizer=BYTES)[0].tolist() == tokens.tolist()


@pytest.mark.parametrize("turns,match", [
    ([], "'turns' must be a non-empty list"),
    ([{"role": "assistant", "segments": [{"text": "x"}]}], "turn 0: role 'assistant', expected 'user'"),
    ([{"role": "user", "segments": [{"text": "x"}]}, {"role": "user", "segments": [{"text": "y"}]}],
     "turn 1: role 'user', expected 'assistant'"),
    ([{"role": "user", "segments": []}], "turn 0: 'segments' must be a non-empty list"),
    ([{"role": "user", "segments": [{"text": "x"}], "name": "bob"}], "turn 0: expected exactly 'role' and 'segments'"),
    ([{"role": "user", "segments": [{"image_tokens": [1]}]}], "turn 0 segment 0: 1 image tokens"),
])
def test_bad_conversations_are_named(tmp_path, turns, match):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"turns": [{"role": "user", "segments": [{"text": "fine"}]}]}) + "\n"
                    + json.dumps({"turns": turns}) + "\n")
    with pytest.raises(DocumentError, match=f"c.jsonl:2: {match}"):
        list(iter_jsonl(path, vocab=V, text_tokenizer=BYTES))


def test_a_conversation_needs_the_conversation_tokens():
    with pytest.raises(DocumentError, match="--conversation-tokens"):
        validate_document({"turns": [{"role": "user", "segments": [{"text": "x"}]}]}, vocab=V_OLD)


# ---- the fit rule -------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=9), st.integers(1, 150))
def test_fit_turns_drops_the_fewest_oldest_exchanges(lengths, budget):
    first = fit_turns(lengths, budget=budget)
    last_user = (len(lengths) - 1) // 2 * 2
    assert first % 2 == 0 and first <= last_user  # whole exchanges; the last user turn stays
    if sum(lengths[first:]) > budget:
        assert first == last_user  # only the last exchange is left
    if first:
        assert sum(lengths[first - 2:]) > budget  # one exchange fewer would not fit
    if sum(lengths) <= budget:
        assert first == 0


words = st.text(alphabet="ab ", min_size=1, max_size=30)
fit_segment = st.one_of(st.builds(lambda s: {"text": s}, words),
                        st.builds(lambda c: {"image_tokens": c}, st.lists(st.integers(0, 31), min_size=4, max_size=4)))
fit_conversations = st.sampled_from([1, 2, 2, 2, 3, 4, 4, 5, 6, 7]).flatmap(lambda n: st.lists(
    st.lists(fit_segment, min_size=1, max_size=3), min_size=n, max_size=n)).map(
    lambda turns: {"turns": [{"role": ("user", "assistant")[i % 2], "segments": s} for i, s in enumerate(turns)]})


def least(seg: dict) -> float:
    """The fewest tokens of a segment the fit rule keeps: an image whole, a text's first word."""
    if "image_tokens" in seg:
        return IMG
    first = re.split(r"(?<=\s)(?=\S)", seg["text"])[0]
    return len(first.encode()) if first.strip() else float("inf")


@settings(max_examples=300, deadline=None)
@given(fit_conversations, st.floats(0.05, 1.1))
def test_fit_conversation_rule(doc, fraction):
    full = tokenize_document(doc, vocab=V, text_tokenizer=BYTES)[0].size
    max_tokens = max(4, round(full * fraction))
    turns = doc["turns"]
    last_user = (len(turns) - 1) // 2 * 2
    try:
        out = fit_conversation(doc, vocab=V, text_tokenizer=BYTES, max_tokens=max_tokens)
    except DocumentError as e:
        assert e.reason == "too_long"
        alone = tokenize_document({"turns": turns[last_user:last_user + 1]}, vocab=V, text_tokenizer=BYTES)[0]
        if "alone" in str(e):  # the last user turn (and <eos>) alone does not fit
            assert alone.size > max_tokens
        else:  # nor does it with the least of its answer: role, <eot> and its first word or image
            assert last_user + 1 < len(turns) and alone.size + 2 + least(turns[-1]["segments"][0]) > max_tokens
        return
    if full <= max_tokens:
        assert out is doc
        return
    kept = out["turns"]
    tokens = tokenize_document(out, vocab=V, text_tokenizer=BYTES)[0]
    assert tokens.size <= max_tokens
    first = len(turns) - len(kept)
    assert first % 2 == 0 and kept[0]["role"] == "user"
    assert kept[0] == turns[first] and turns[last_user] in kept  # the last user turn is never dropped
    assert kept[:-1] == turns[first:len(turns) - 1]  # whole turns but maybe the last answer
    if kept[-1] != turns[-1]:  # a cut answer: only when nothing older is left
        assert len(kept) == 2 and kept[-1]["role"] == "assistant"
        src = turns[-1]["segments"]
        for seg in kept[-1]["segments"]:  # images whole, text a prefix of a source text
            assert seg in src or any("text" in s and s["text"].startswith(seg["text"]) for s in src)
    elif first:  # dropping one exchange fewer would not have fit
        longer = {"turns": turns[first - 2:]}
        assert tokenize_document(longer, vocab=V, text_tokenizer=BYTES)[0].size > max_tokens


def test_fit_conversation_by_hand():
    turn = lambda r, t: {"role": r, "segments": [{"text": t}]}  # noqa: E731
    doc = {"turns": [turn("user", "aaaa"), turn("assistant", "bbbb"), turn("user", "cc"),
                     turn("assistant", "dd dd dd")], "id": 7}
    # lengths 6, 6, 4, 10 + <eos>: 27 fits 27; 26 drops the first exchange; 12 cuts the last answer
    assert fit_conversation(doc, vocab=V, text_tokenizer=BYTES, max_tokens=27) is doc
    assert fit_conversation(doc, vocab=V, text_tokenizer=BYTES, max_tokens=26) == {"turns": doc["turns"][2:], "id": 7}
    assert fit_conversation(doc, vocab=V, text_tokenizer=BYTES, max_tokens=12)["turns"][1] == turn("assistant", "dd")
    with pytest.raises(DocumentError, match="leaves no room"):
        fit_conversation(doc, vocab=V, text_tokenizer=BYTES, max_tokens=8)
    img = {"image_tokens": [1, 2, 3, 4]}
    doc2 = {"turns": [turn("user", "q"), {"role": "assistant", "segments": [{"text": "x"}, img]}]}
    # 3 + (2 + 1 + 6) + 1 = 13; at 12 the image is dropped whole, never cut
    assert fit_conversation(doc2, vocab=V, text_tokenizer=BYTES, max_tokens=12)["turns"][1]["segments"] == [{"text": "x"}]


# ---- LIMA with every turn -----------------------------------------------------------------------
def test_lima_keeps_every_answered_turn_with_conversation_tokens(tmp_path):
    rec = {"conversations": ["q1?", "a1.", "q2?", "a2.", "q3?"]}
    conv = lima_to_document(rec, all_turns=True)
    assert [t["role"] for t in conv["turns"]] == ["user", "assistant", "user", "assistant"]
    assert conv["turns"][3]["segments"] == [{"text": "a2."}]
    path = tmp_path / "lima.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    new = [r.doc for r in iter_jsonl(path, vocab=V, text_tokenizer=BYTES,
                                     transform=make_transform("lima", vocab=V, text_tokenizer=BYTES))]
    assert new == [conv]
    old = [r.doc for r in iter_jsonl(path, vocab=V_OLD, text_tokenizer=BYTES,
                                     transform=make_transform("lima", vocab=V_OLD, text_tokenizer=BYTES))]
    assert old == [{"prompt": "q1?\n\n", "response": [{"text": "a1."}]}]  # no conversation tokens: one exchange
    # the fit rule applies to LIMA conversations: the oldest exchange goes first
    short = make_transform("lima", vocab=V, text_tokenizer=BYTES, max_tokens=14)(rec)
    assert short == {"turns": conv["turns"][2:]}
    with pytest.raises(DocumentError, match="expected"):
        make_transform("conversation", vocab=V, text_tokenizer=BYTES)({"segments": [{"text": "x"}]})


def test_conversation_images_as_files_in_either_role(tmp_path):
    from PIL import Image

    class RedTokenizer:
        def encode_images(self, images):
            return np.stack([np.full((2, 2), np.asarray(im)[0, 0, 0] // 8) for im in images])

    for name, red in (("a.png", 80), ("b.png", 160)):
        Image.new("RGB", (4, 4), (red, 0, 0)).save(tmp_path / name)
    doc = {"turns": [{"role": "user", "segments": [{"image": "a.png"}, {"text": "like this"}]},
                     {"role": "assistant", "segments": [{"image": "b.png"}]}]}
    tokens, mask = tokenize_document(doc, vocab=V, text_tokenizer=BYTES, image_tokenizer=RedTokenizer(),
                                     base_dir=tmp_path)
    codes = tokens[V.is_image(tokens)] - V.image_start
    assert codes.tolist() == [10] * 4 + [20] * 4
    assert mask[V.is_image(tokens)].tolist() == [False] * 4 + [True] * 4


def test_jam_data_vocab_and_binarize_conversations(tmp_path, capsys):
    from jam_metaseq.data.binarize import open_dataset
    from jam_metaseq.data.cli import main

    assert main(["vocab", "--tokenizer", "bytes", "--image-codes", "32", "--image-grid", "2", "2",
                 "--sentinels", "4", "--conversation-tokens", "--out", str(tmp_path / "v.json")]) == 0
    ids = json.loads(capsys.readouterr().out)
    vocab = VocabManifest.load(tmp_path / "v.json")
    assert vocab.to_dict()["ids"] == V.to_dict()["ids"] and ids["eot"] == V.eot
    turn = lambda r, t: {"role": r, "segments": [{"text": t}]}  # noqa: E731
    docs = [{"turns": [turn("user", "q" * 30), turn("assistant", "a" * 30), turn("user", "hi"), turn("assistant", "yo")]},
            {"turns": [turn("user", "x"), turn("assistant", "y")]}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = ["--vocab", str(tmp_path / "v.json"), "--tokenizer", "bytes", "--json"]
    assert main(["binarize", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "ds"), "--format", "conversation",
                 "--max-tokens", "20", *common]) == 0
    ds = open_dataset(tmp_path / "ds")
    first, second = ds.document(0), ds.document(1)
    assert first["tokens"].size == 9  # the first exchange was dropped: <user>hi<eot><assistant>yo<eot><eos>
    assert first["loss_mask"].tolist() == [False] * 5 + [True] * 3 + [False]
    assert second["loss_mask"].sum() == 2  # "y" and its <eot>


def test_data_of_a_manifest_reads_under_it_with_conversation_tokens(tmp_path):
    """The instruct stage trains on caption data binarized before its manifest gained the
    conversation tokens: that manifest plus the tokens reads it (every id means the same); any
    other manifest is refused."""
    from jam_metaseq.data.binarize import binarize, open_dataset

    (tmp_path / "t.jsonl").write_text(json.dumps({"segments": [{"text": "a red circle"}]}) + "\n")
    binarize([tmp_path / "t.jsonl"], out_prefix=tmp_path / "ds", vocab=V_OLD, text_tokenizer=BYTES,
             block_size=64, progress=False)
    assert V_OLD.with_conversation_tokens() == V and V.with_conversation_tokens() is V
    assert V.extends(V_OLD) and V_OLD.extends(V_OLD) and not V_OLD.extends(V)
    assert open_dataset(tmp_path / "ds", vocab=V).vocab == V_OLD
    for other in (tiny_manifest(text_size=255, image_codes=32, image_grid=(2, 2), num_sentinels=4),
                  dataclasses.replace(V, text_tokenizer="spm:other.model")):
        with pytest.raises(ValueError, match="binarized with a vocabulary"):
            open_dataset(tmp_path / "ds", vocab=other)

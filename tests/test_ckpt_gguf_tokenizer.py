"""The tokenizer a GGUF carries, written for our data tools (``checkpoints_tools/gguf_tokenizer.py``,
``jam-ckpt tokenizer``; issue 28), on tiny files written here; the real SmolLM2 file against
transformers' GGUF tokenizer is ``tests/test_gguf_smollm2.py``.

A byte-level BPE trained here with ``tokenizers`` and stored in a GGUF's metadata (tokens,
merges, token types; ``gpt-2`` pre-tokenizer) comes back encoding every text to the same ids, its
control tokens matched whole; ``smollm`` isolates each numeral first. The manifest keeps the text
ids as they are (``VocabManifest.after_text``), and ``jam-data binarize`` takes both files.
What the file cannot describe (a sentencepiece model, an unknown pre-tokenizer, duplicate tokens,
merges of tokens it does not have) is refused in one line naming the key.
"""

from __future__ import annotations

import json

import pytest

from _gguf_util import hf_llama, write_llama_gguf
from checkpoints_tools import cli as ckpt_cli
from checkpoints_tools.io.gguf import read_gguf_header
from checkpoints_tools.gguf_tokenizer import tokenizer_from_gguf
from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.data.binarize import binarize, open_dataset
from jam_metaseq.data.tokenizers import load_text_tokenizer
from jam_metaseq.vocab import VocabManifest, tiny_manifest

tokenizers = pytest.importorskip("tokenizers")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["The year 1999 and 2024 were 12 and 34 months.", "Hello world, hello again: 123 456 7890!",
          "Zebras graze; quick brown foxes jump over lazy dogs.", "Numbers like 11, 22, 33 and 12345 matter."] * 20
TEXTS = ["Hello world", "  two  spaces\tand a tab\n\nnew lines", "émigré café 日本 😀", "year 2024, 1,000.5",
         "<|im_start|>user\nhi<|im_end|>\n", "don't we'll", "zebra<|endoftext|>fox"]


@pytest.fixture(scope="module")
def trained():
    """(the trained tokenizer, the GGUF tokenizer metadata of it)."""
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator(CORPUS, vocab_size=400, min_frequency=2, special_tokens=SPECIALS, show_progress=False)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    assert tokens[:3] == SPECIALS and any(t.isdigit() and len(t) > 1 for t in tokens)  # merged numbers exist
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    meta = dict(tokens=tokens, merges=merges, types=[3] * 3 + [1] * (len(tokens) - 3), pre="gpt-2",
                bos=1, eos=2, unk=0, pad=2)
    return tok, meta


def _gguf(tmp_path, meta, name="tok.gguf"):
    return write_llama_gguf(tmp_path / name, hf_llama(vocab_size=len(meta["tokens"])), tokenizer=meta)


def test_same_ids_as_the_trained_tokenizer(tmp_path, trained):
    tok, meta = trained
    ours = tokenizer_from_gguf(read_gguf_header(_gguf(tmp_path, meta)))
    for text in TEXTS:
        want = tok.encode(text).ids
        assert ours.encode(text, add_special_tokens=False).ids == want, text
        assert ours.decode(want, skip_special_tokens=False) == text
    assert ours.encode("<|im_end|>", add_special_tokens=False).ids == [2]  # a control token, matched whole


def test_smollm_isolates_numerals(tmp_path, trained):
    tok, meta = trained
    ours = tokenizer_from_gguf(read_gguf_header(_gguf(tmp_path, dict(meta, pre="smollm"))))
    vocab = ours.get_vocab()
    assert len(tok.encode(" 2024").ids) < 5  # GPT-2's split keeps " 2024" whole, and merges it
    assert ours.encode(" 2024", add_special_tokens=False).ids == [vocab[c] for c in ("Ġ", "2", "0", "2", "4")]
    assert ours.encode("Hello world", add_special_tokens=False).ids == tok.encode("Hello world").ids


def test_jam_ckpt_tokenizer_feeds_jam_data(tmp_path, trained, capsys):
    tok, meta = trained
    src = _gguf(tmp_path, meta)
    out = tmp_path / "out"
    assert ckpt_cli.main(["tokenizer", str(src), "-o", str(out), "--image-codes", "16", "--image-grid", "2", "2",
                          "--sentinels", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["specials"] == {"bos": 1, "pad": 0, "eos": 2, "unk": 0}  # pad: the file's is its eos
    vocab = VocabManifest.load(out / "vocab.json")
    n = len(meta["tokens"])
    assert (vocab.text_start, vocab.text_end, vocab.image_start, vocab.image_codes) == (0, n, n, 16)
    assert (vocab.bos, vocab.pad, vocab.eos, vocab.unk) == (1, 0, 2, 0)
    text_tok = load_text_tokenizer(vocab.text_tokenizer)  # the manifest names the file written beside it
    assert text_tok.vocab_size == n
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps([{"text": t}]) + "\n" for t in TEXTS))
    binarize(docs, out_prefix=tmp_path / "bin", vocab=vocab, text_tokenizer=text_tok, progress=False)
    data = open_dataset(tmp_path / "bin", vocab=vocab)
    for j, text in enumerate(TEXTS):
        assert data.document(j)["tokens"].tolist() == tok.encode(text).ids + [2], text  # ids as they are, then eos
    assert ckpt_cli.main(["tokenizer", str(src), "-o", str(out)]) != 0  # kept unless --overwrite
    assert "exists (--overwrite replaces it)" in capsys.readouterr().err
    assert ckpt_cli.main(["tokenizer", str(src), "-o", str(out), "--overwrite"]) == 0


REFUSED = {
    "sentencepiece": (dict(model="llama"), "tokenizer.ggml.model 'llama' is not supported"),
    "pre": (dict(pre="qwen2"), "tokenizer.ggml.pre 'qwen2' is not supported"),
    "duplicate": (dict(duplicate=True), "holds 'a' twice"),
    "merge": (dict(bad_merge=True), "tokenizer.ggml.merges[0] 'Ġ zz' is not a merge"),
    "types": (dict(types=[1, 1]), "token_type has 2 entries"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_in_one_line(tmp_path, trained, case):
    _, meta = trained
    change, message = REFUSED[case]
    meta = dict(meta)
    if change.get("duplicate"):
        meta["tokens"] = meta["tokens"][:-1] + ["a"]
    if change.get("bad_merge"):
        meta["merges"] = ["Ġ zz"] + meta["merges"]
    if "types" in change:
        meta["types"] = change["types"]
    for k in ("pre", "model"):
        if k in change:
            meta[k] = change[k]
    path = _gguf(tmp_path, meta)
    with pytest.raises(CheckpointError) as e:
        tokenizer_from_gguf(read_gguf_header(path))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_manifest_after_text():
    v = VocabManifest.after_text(100, specials={"bos": 1, "pad": 0, "eos": 2, "unk": 0}, image_codes=8,
                                 image_tokens_per_image=4, image_grid=(2, 2), num_sentinels=2)
    assert (v.text_start, v.text_end, v.image_start, v.break_id, v.sentinel_start, v.eoss, v.size) == \
        (0, 100, 100, 108, 109, 111, 112)
    assert (v.bos, v.pad, v.eos, v.unk) == (1, 0, 2, 0)
    assert v.is_text(3) and not v.is_text(100)
    d = v.to_dict()
    assert d["layout"] == "explicit" and d["ids"]["text"] == [0, 100] and d["ids"]["bos"] == 1
    assert VocabManifest.from_dict(json.loads(json.dumps(d))) == v
    assert "layout" not in tiny_manifest().to_dict()  # our own manifests are unchanged
    assert tiny_manifest().text_start == 4 and tiny_manifest().bos == 0
    for bad, msg in (({"bos": 1, "eos": 2}, "name no pad, unk"), ({"bos": 1, "pad": 0, "eos": 100, "unk": 0}, "eos=100")):
        with pytest.raises(ValueError, match=msg):
            VocabManifest.after_text(100, specials=bad)

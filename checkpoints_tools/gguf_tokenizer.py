"""The text tokenizer a GGUF file carries in its metadata, as the files our data tools take
(``jam-ckpt tokenizer``; issue 28): a Hugging Face ``tokenizers`` JSON and a vocabulary manifest.

A GGUF of a byte-level BPE (``tokenizer.ggml.model = gpt2``) stores its vocabulary
(``tokenizer.ggml.tokens``, id = position), merges (``tokenizer.ggml.merges``, ``"a b"``, best
first), token types (``tokenizer.ggml.token_type``: 3 = control, 4 = user-defined) and the name of
the split applied before the merges (``tokenizer.ggml.pre``). ``tokenizer_from_gguf`` rebuilds it:

- the BPE model from the tokens and merges, ids as they are;
- the pre-tokenizer llama.cpp runs for that name (``PRE_TOKENIZERS``: regexes that isolate their
  matches, then GPT-2's byte-level split); ``smollm`` isolates every numeric character first
  (``\\p{N}``), as SmolLM2's own tokenizer does. (transformers' GGUF loader has no ``smollm``
  entry and uses GPT-2's split alone, which differs where a space precedes a non-ASCII numeral,
  e.g. " ½"; ``tests/test_gguf_smollm2.py`` pins ours.)
- control tokens (``<|im_end|>``) as special added tokens, user-defined ones as plain added tokens:
  matched whole in text, as llama.cpp and transformers match them.

The manifest (``vocab_manifest``) keeps the text ids as they are (``VocabManifest.after_text``, an
explicit-ids manifest: the file's bos, eos and unknown ids; pad by ``readers.gguf.padding_rule``, the
id the model masks), with image codes, sentinels and the rest after them as ``jam-data vocab`` lays
them out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from checkpoints_tools.io.gguf import GGUFHeader, read_gguf_header
from checkpoints_tools.readers.gguf import padding_rule
from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.vocab import SPECIAL_NAMES, VocabManifest

GPT2_SPLIT = ()
"""No split before GPT-2's own (``ByteLevel(use_regex=True)``)."""
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "gpt-2": GPT2_SPLIT,
    **{name: (r"\p{N}",) for name in ("smollm", "starcoder", "refact", "command-r", "codeshell")},
}
"""``tokenizer.ggml.pre`` -> the regexes llama.cpp isolates, in order, before GPT-2's byte-level
split (its ``llama-vocab.cpp`` groups these names under one rule)."""
BPE_MODEL = "gpt2"
CONTROL, USER_DEFINED = 3, 4
"""``tokenizer.ggml.token_type`` values of tokens matched whole in text."""
FILE_NAME = "tokenizer.json"


def _field(header: GGUFHeader, key: str, kind: type, *, required: bool = True) -> Any:
    v = header.metadata.get(key)
    if v is None:
        if required:
            raise CheckpointError(f"{header.path}: metadata lacks {key} (no tokenizer in this GGUF file?)")
        return None
    ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    if kind is list and ok:
        ok = all(isinstance(x, str) for x in v) if key != "tokenizer.ggml.token_type" else \
            all(isinstance(x, int) for x in v)
    if not ok:
        raise CheckpointError(f"{header.path}: metadata {key} has the wrong type ({type(v).__name__})")
    return v


def tokenizer_from_gguf(header: GGUFHeader):
    """The file's tokenizer as a ``tokenizers.Tokenizer`` (see the module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    path = header.path
    model = _field(header, "tokenizer.ggml.model", str)
    if model != BPE_MODEL:
        raise CheckpointError(f"{path}: tokenizer.ggml.model {model!r} is not supported (only {BPE_MODEL!r}, a "
                              "byte-level BPE)")
    pre = _field(header, "tokenizer.ggml.pre", str, required=False) or "gpt-2"
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported ({', '.join(PRE_TOKENIZERS)})")
    tokens = _field(header, "tokenizer.ggml.tokens", list)
    merges = _field(header, "tokenizer.ggml.merges", list)
    types = _field(header, "tokenizer.ggml.token_type", list, required=False) or [1] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if vocab.setdefault(t, i) != i:
            raise CheckpointError(f"{path}: tokenizer.ggml.tokens holds {t!r} twice (ids {vocab[t]} and {i})")
    pairs = []
    for i, m in enumerate(merges):
        pair = tuple(m.split(" "))
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or "".join(pair) not in vocab:
            raise CheckpointError(f"{path}: tokenizer.ggml.merges[{i}] {m!r} is not a merge of two tokens into a "
                                  "third")
        pairs.append(pair)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise CheckpointError(f"{path}: the tokenizer has {tok.get_vocab_size(with_added_tokens=True)} ids, the "
                              f"file lists {len(tokens)} tokens")
    return tok


def text_specials(header: GGUFHeader) -> dict[str, int]:
    """(bos, pad, eos, unk) among the file's text ids: its bos, eos and unknown tokens, and the id
    its model masks as padding (``padding_rule``; the unknown id is that id when the file has none)."""
    bos = _field(header, "tokenizer.ggml.bos_token_id", int)
    eos = _field(header, "tokenizer.ggml.eos_token_id", int)
    pad, _ = padding_rule(header.metadata)
    if pad is None:
        raise CheckpointError(f"{header.path}: no id to pad with: tokenizer.ggml.padding_token_id and "
                              "unknown_token_id are missing or are bos/eos")
    unk = _field(header, "tokenizer.ggml.unknown_token_id", int, required=False)
    return dict(zip(SPECIAL_NAMES, (bos, pad, eos, pad if unk is None else unk)))


def vocab_manifest(header: GGUFHeader, *, layout: Mapping[str, Any], text_tokenizer: str | None) -> VocabManifest:
    """The vocabulary of models in this file's tokenizer plus image codes: its text ids as they are
    (``VocabManifest.after_text``), then ``layout`` (``jam_metaseq.data.cli.layout_of``)."""
    tokens = _field(header, "tokenizer.ggml.tokens", list)
    try:
        return VocabManifest.after_text(len(tokens), specials=text_specials(header), text_tokenizer=text_tokenizer,
                                        **layout)
    except ValueError as e:
        raise CheckpointError(f"{header.path}: {e}") from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_tokenizer(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, layout: Mapping[str, Any],
                    overwrite: bool = False) -> dict[str, Any]:
    """Write ``out_dir/tokenizer.json`` and ``out_dir/vocab.json`` (each atomically) from the GGUF
    file's tokenizer; an existing file is replaced only with ``overwrite``. Returns a summary."""
    from jam_metaseq.vocab import FILE_NAME as VOCAB_FILE

    header = read_gguf_header(gguf_path)
    out = Path(out_dir)
    targets = [out / FILE_NAME, out / VOCAB_FILE]
    if not overwrite:
        there = [str(t) for t in targets if t.exists()]
        if there:
            raise CheckpointError(f"{there[0]} exists (--overwrite replaces it)")
    tok = tokenizer_from_gguf(header)
    manifest = vocab_manifest(header, layout=layout, text_tokenizer=f"bpe:{targets[0].resolve()}")
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(targets[0], tok.to_str(pretty=True))
    manifest.save(targets[1])
    return {"tokenizer": str(targets[0]), "vocab": str(targets[1]), "text_size": manifest.text_size,
            "pre_tokenizer": header.metadata.get("tokenizer.ggml.pre", "gpt-2"),
            "specials": {k: getattr(manifest, k) for k in SPECIAL_NAMES}, "ids": manifest.to_dict()["ids"],
            "chat_template": bool(header.metadata.get("tokenizer.chat_template"))}

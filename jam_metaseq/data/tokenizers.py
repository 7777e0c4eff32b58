"""Text tokenizers behind one small interface (paper §3.1 "Tokenizers").

JAM reuses its parents' text tokenizer; this module loads either kind the parents may use:
a sentencepiece model (``*.model``) or a Hugging Face ``tokenizers`` byte-level BPE in the
GPT-2/OPT style (``*.json``). A byte tokenizer (``bytes``: ids 0..255 = UTF-8 bytes) needs no
file and serves the quickstart and the tests.

Public API::

    load_text_tokenizer(path_or_spec) -> TextTokenizer
        "x.model" | "spm:PATH"  -> sentencepiece;  "x.json" | "bpe:PATH" -> HF byte-level BPE;
        "bytes"                  -> UTF-8 bytes (vocab 256)
    TextTokenizer: .encode(str) -> list[int]  (0-based tokenizer ids; the vocabulary manifest
                   shifts them by ``vocab.text_start``), .decode(list[int]) -> str, .vocab_size,
                   .spec (string that reloads it), .token_bytes() -> list[bytes | str] (what each
                   id stands for: its UTF-8 bytes, or a special token's name; ``vocab_transplant``)
    train_sentencepiece(texts, *, out_prefix, vocab_size, model_type="bpe") -> path of .model
    train_bpe(texts, *, out_path, vocab_size) -> path of .json
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

SPACE_MARK = "\u2581"
"""``▁``: sentencepiece's (and Metaspace tokenizers') spelling of a space inside a piece."""
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
"""A byte-fallback piece (``<0xE2>``): one raw byte."""


@runtime_checkable
class TextTokenizer(Protocol):
    """What the data pipeline and the generator need from a text tokenizer."""

    spec: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_bytes(self) -> list[bytes | str]: ...


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, char -> byte: printable bytes stand for themselves, the other
    68 are shifted to U+0100.. in byte order (``Ġ`` = space), so every byte is one visible char."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    out, shifted = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + shifted)] = b
            shifted += 1
    return out


def piece_bytes(piece: str) -> bytes:
    """A sentencepiece / Metaspace piece's text as bytes: ``▁`` is a space, ``<0xHH>`` one byte."""
    m = _BYTE_PIECE.match(piece)
    return bytes([int(m.group(1), 16)]) if m else piece.replace(SPACE_MARK, " ").encode("utf-8")


class ByteTokenizer:
    """UTF-8 bytes as ids (vocab 256); decoding replaces invalid sequences."""

    spec = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> list[bytes | str]:
        return [bytes([i]) for i in range(256)]


class SentencePieceTokenizer:
    """A sentencepiece model file."""

    def __init__(self, path: str | os.PathLike) -> None:
        import sentencepiece as spm

        self.path = str(path)
        self.spec = f"spm:{self.path}"
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = int(self._sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_bytes(self) -> list[bytes | str]:
        """Each piece's text (``▁`` = space, byte pieces their byte); control and unknown pieces by name."""
        sp = self._sp
        return [sp.id_to_piece(i) if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
                else piece_bytes(sp.id_to_piece(i)) for i in range(self.vocab_size)]


class HFTokenizer:
    """A Hugging Face ``tokenizers`` JSON file (byte-level BPE, GPT-2/OPT style)."""

    def __init__(self, path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer

        self.path = str(path)
        self.spec = f"bpe:{self.path}"
        self._tok = Tokenizer.from_file(self.path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self) -> list[bytes | str]:
        """Each token's text: through the byte-level alphabet when the file decodes byte-level (GPT-2,
        OPT, Llama-3, Qwen2), else as pieces (``▁``, ``<0xHH>``: Llama-2/Chameleon-style files);
        special added tokens by name."""
        spec = json.loads(self._tok.to_str())
        byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
        alphabet = byte_level_alphabet()
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        out: list[bytes | str] = [""] * self.vocab_size
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i in special:
                out[i] = token
            elif byte_level and all(c in alphabet for c in token):
                out[i] = bytes(alphabet[c] for c in token)
            else:
                out[i] = piece_bytes(token)
        return out


def load_text_tokenizer(path_or_spec: str | os.PathLike) -> TextTokenizer:
    """Open a text tokenizer from a file path or a spec (see the module docstring)."""
    spec = str(path_or_spec)
    if spec == "bytes":
        return ByteTokenizer()
    kind = None
    if spec.startswith("spm:"):
        kind, spec = "spm", spec[4:]
    elif spec.startswith("bpe:"):
        kind, spec = "bpe", spec[4:]
    elif spec.endswith(".model"):
        kind = "spm"
    elif spec.endswith(".json"):
        kind = "bpe"
    if kind is None:
        raise ValueError(
            f"cannot tell the tokenizer kind of {spec!r}: use a .model (sentencepiece) or .json "
            "(HF tokenizers) file, a spm:/bpe: prefix, or 'bytes'"
        )
    if not Path(spec).is_file():
        raise FileNotFoundError(f"text tokenizer file not found: {spec}")
    try:
        return SentencePieceTokenizer(spec) if kind == "spm" else HFTokenizer(spec)
    except Exception as e:  # noqa: BLE001 - sentencepiece/tokenizers raise bare RuntimeError/Exception
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        what = "sentencepiece model" if kind == "spm" else "HF tokenizers JSON"
        raise ValueError(f"{spec}: not a readable {what} ({first})") from None


def train_sentencepiece(
    texts: Iterable[str], *, out_prefix: str | os.PathLike, vocab_size: int, model_type: str = "bpe",
) -> str:
    """Train a small sentencepiece model (unk=0, no bos/eos: the manifest owns those)."""
    import sentencepiece as spm

    out_prefix = str(out_prefix)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_prefix=out_prefix, vocab_size=vocab_size,
        model_type=model_type, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        byte_fallback=False, hard_vocab_limit=False, num_threads=1,
        minloglevel=2,
    )
    return out_prefix + ".model"


def train_bpe(texts: Iterable[str], *, out_path: str | os.PathLike, vocab_size: int) -> str:
    """Train a byte-level BPE (GPT-2/OPT style) and save it as one JSON file, atomically."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=1, show_progress=False)
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tok.save(str(tmp))
    os.replace(tmp, out_path)
    return str(out_path)

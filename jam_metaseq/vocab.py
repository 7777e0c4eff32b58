"""The vocabulary layout shared by data, checkpoints, trainer and generator (paper §3.1 Tokenizers).

One JSON manifest describes every id:
  [bos=0, pad=1, eos=2, unk=3]  fairseq/metaseq Dictionary specials
  [text_start, text_end)        text tokenizer ids, shifted by text_start
                                (``text_specials``: an imported LLM's vocabulary kept as it is, its
                                text ids from 0 and bos/pad/eos/unk among them; no fairseq specials)
  [image_start, image_end)      image codes (default 8192: a 32x32 VQ grid per image)
  break                         <break>, framing every image: <break> img_0 .. img_1023 <break>
  [sentinel_start, +num_sentinels)  CM3 sentinels <mask:0> ... <mask:K-1>
  eoss                          end-of-span token closing each moved span
  user, assistant, eot          conversation tokens, only with ``conversation_tokens``: the role
                                token opening each turn and the end-of-turn token closing it
                                (docs/CONVERSATIONS.md)
  [.., size)                    filler rows so that size is a multiple of ``pad_to_multiple``

``<mask:0>`` doubles as the classifier-free-guidance ``<mask>``: the unconditional context is
the CM3 infilling input whose condition was cut out (paper §3.1, Decoding Strategies).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import numpy as np

from jam_metaseq.inputs import FieldError, int_field, read_json, str_field

BOS, PAD, EOS, UNK = 0, 1, 2, 3
NUM_DICT_SPECIALS = 4
SPECIAL_NAMES = ("bos", "pad", "eos", "unk")
CONVERSATION_SYMBOLS = ("<user>", "<assistant>", "<eot>")
NUM_CONVERSATION_TOKENS = len(CONVERSATION_SYMBOLS)
MANIFEST_VERSION = 1
FILE_NAME = "vocab.json"
"""A manifest beside a checkpoint (in its directory) or at the top of a data directory."""
CHECKPOINT_KEY = "jam_vocab"
"""Where a checkpoint stores its manifest (as ``to_dict()``): a top-level entry of a ``.pt``, an
``__metadata__`` entry (JSON) of a safetensors file."""
TASK_STATE_KEY = "vocab_manifest"
"""Where a host-trained checkpoint stores it: ``task_state[TASK_STATE_KEY]`` (the task's state)."""
MAX_VOCAB_SIZE = 2**31 - 1
"""Bound of a manifest's total size (embedding rows are indexed by int32 on every host)."""
MAX_SENTINELS = 2**16
MAX_PAD_MULTIPLE = 2**16


def _check_fields(m: "VocabManifest", *, source: str) -> None:
    """Every field's type, sign and range (issue 27 §3: a manifest is checked where it is read);
    ``FieldError`` naming ``source`` and the field. Normalises ``image_grid`` to a tuple of ints."""
    text_size = int_field(m.text_size, name="text_size", source=source, lo=0, hi=MAX_VOCAB_SIZE)
    image_codes = int_field(m.image_codes, name="image_codes", source=source, lo=0, hi=MAX_VOCAB_SIZE)
    sentinels = int_field(m.num_sentinels, name="num_sentinels", source=source, lo=1, hi=MAX_SENTINELS)
    pad = int_field(m.pad_to_multiple, name="pad_to_multiple", source=source, lo=1, hi=MAX_PAD_MULTIPLE)
    per_image = int_field(m.image_tokens_per_image, name="image_tokens_per_image", source=source, lo=1,
                          hi=MAX_VOCAB_SIZE)
    grid = m.image_grid
    if not isinstance(grid, (list, tuple)) or len(grid) != 2:
        raise FieldError(f"{source}: field 'image_grid' must be [rows, cols], got {grid!r}")
    grid = tuple(int_field(g, name=f"image_grid[{i}]", source=source, lo=1, hi=MAX_VOCAB_SIZE)
                 for i, g in enumerate(grid))
    str_field(m.text_tokenizer, name="text_tokenizer", source=source, optional=True)
    if not isinstance(m.conversation_tokens, bool):
        raise FieldError(f"{source}: field 'conversation_tokens' must be true or false, got {m.conversation_tokens!r}")
    if m.text_specials is not None:
        sp = m.text_specials
        if isinstance(sp, Mapping):
            if set(sp) != set(SPECIAL_NAMES):
                raise FieldError(f"{source}: field 'text_specials' needs exactly {', '.join(SPECIAL_NAMES)}; "
                                 f"got {sorted(map(str, sp))}")
            sp = tuple(sp[k] for k in SPECIAL_NAMES)
        if not isinstance(sp, (list, tuple)) or len(sp) != len(SPECIAL_NAMES):
            raise FieldError(f"{source}: field 'text_specials' must be four ids (bos, pad, eos, unk), got {sp!r}")
        sp = tuple(int_field(i, name=f"text_specials.{k}", source=source, lo=0, hi=max(text_size - 1, 0))
                   for k, i in zip(SPECIAL_NAMES, sp))
        if text_size == 0:
            raise FieldError(f"{source}: field 'text_specials' needs ids of the text range, but text_size is 0")
        object.__setattr__(m, "text_specials", sp)
    for name, v in (("text_size", text_size), ("image_codes", image_codes), ("num_sentinels", sentinels),
                    ("pad_to_multiple", pad), ("image_tokens_per_image", per_image)):
        object.__setattr__(m, name, v)
    object.__setattr__(m, "image_grid", grid)
    if grid[0] * grid[1] != per_image:
        raise FieldError(f"{source}: field 'image_grid' {list(grid)} does not hold field "
                         f"'image_tokens_per_image' {per_image} (rows x cols must equal it)")
    if m.size > MAX_VOCAB_SIZE:
        raise FieldError(f"{source}: the fields give {m.size} ids, more than {MAX_VOCAB_SIZE}")


@dataclass(frozen=True)
class VocabManifest:
    """Ids of every token class; derived ranges are properties."""

    text_size: int
    """Number of text-tokenizer ids (placed at [4, 4 + text_size))."""
    image_codes: int = 8192
    """Number of image codes."""
    num_sentinels: int = 16
    """CM3 sentinels <mask:0> ... <mask:num_sentinels-1> (max spans per sequence)."""
    pad_to_multiple: int = 8
    """The total size is rounded up to this multiple (fairseq Dictionary padding)."""
    image_tokens_per_image: int = 1024
    """Tokens per image (VQ grid h * w)."""
    image_grid: tuple[int, int] = (32, 32)
    """VQ grid (rows, cols) of one image."""
    text_tokenizer: str | None = None
    """Path or description of the text tokenizer model (informational)."""
    conversation_tokens: bool = False
    """Add ``<user>``, ``<assistant>`` and ``<eot>`` after ``<eoss>`` (multi-turn conversations;
    every earlier id keeps its place, so a checkpoint gains rows, ``jam_metaseq.vocab_rows``)."""
    text_specials: tuple[int, int, int, int] | None = None
    """An imported text LLM's vocabulary kept as it is (issue 28: a GGUF's tokenizer): the text ids
    start at 0 and these ids of its own serve as (bos, pad, eos, unk), given as a mapping with those
    keys or a tuple in that order. None: fairseq's four specials at 0..3, then the text ids (every
    model trained here)."""

    def __post_init__(self) -> None:
        _check_fields(self, source="vocab manifest")  # num_sentinels >= 1: <mask:0> is the CFG mask

    # ---- ids -------------------------------------------------------------------------------
    @property
    def bos(self) -> int:
        return BOS if self.text_specials is None else self.text_specials[0]

    @property
    def pad(self) -> int:
        return PAD if self.text_specials is None else self.text_specials[1]

    @property
    def eos(self) -> int:
        return EOS if self.text_specials is None else self.text_specials[2]

    @property
    def unk(self) -> int:
        return UNK if self.text_specials is None else self.text_specials[3]

    @property
    def text_start(self) -> int:
        return NUM_DICT_SPECIALS if self.text_specials is None else 0

    @property
    def text_end(self) -> int:
        return self.text_start + self.text_size

    @property
    def image_start(self) -> int:
        return self.text_end

    @property
    def image_end(self) -> int:
        return self.image_start + self.image_codes

    @property
    def break_id(self) -> int:
        return self.image_end

    @property
    def sentinel_start(self) -> int:
        return self.break_id + 1

    @property
    def sentinel_end(self) -> int:
        return self.sentinel_start + self.num_sentinels

    @property
    def mask_id(self) -> int:
        """The CFG ``<mask>`` (= ``<mask:0>``)."""
        return self.sentinel_start

    @property
    def eoss(self) -> int:
        return self.sentinel_end

    @property
    def user_id(self) -> int:
        """``<user>``: opens a user turn (``conversation_tokens`` only)."""
        return self._conversation_id(0, "<user>")

    @property
    def assistant_id(self) -> int:
        """``<assistant>``: opens an assistant turn (``conversation_tokens`` only)."""
        return self._conversation_id(1, "<assistant>")

    @property
    def eot(self) -> int:
        """``<eot>``: closes every turn; a chat answer ends with it (``conversation_tokens`` only)."""
        return self._conversation_id(2, "<eot>")

    def _conversation_id(self, i: int, name: str) -> int:
        if not self.conversation_tokens:
            raise ValueError(f"this vocabulary has no {name} token: make the manifest with conversation "
                             "tokens (jam-data vocab --conversation-tokens)")
        return self.eoss + 1 + i

    def role_id(self, role: str) -> int:
        """The token opening a turn of ``role`` (``user`` or ``assistant``)."""
        if role == "user":
            return self.user_id
        if role == "assistant":
            return self.assistant_id
        raise ValueError(f"unknown conversation role {role!r}; expected 'user' or 'assistant'")

    @property
    def num_used(self) -> int:
        return self.eoss + 1 + (NUM_CONVERSATION_TOKENS if self.conversation_tokens else 0)

    @property
    def size(self) -> int:
        m = self.pad_to_multiple
        return ((self.num_used + m - 1) // m) * m

    @property
    def text_range(self) -> range:
        return range(self.text_start, self.text_end)

    @property
    def image_range(self) -> range:
        return range(self.image_start, self.image_end)

    @property
    def sentinel_range(self) -> range:
        return range(self.sentinel_start, self.sentinel_end)

    def sentinel(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise IndexError(f"sentinel {i} out of range [0, {self.num_sentinels})")
        return self.sentinel_start + i

    # ---- predicates (work on ints and on numpy / torch arrays) ------------------------------
    def is_image(self, ids: Any) -> Any:
        return (ids >= self.image_start) & (ids < self.image_end)

    def is_text(self, ids: Any) -> Any:
        return (ids >= self.text_start) & (ids < self.text_end)

    def is_sentinel(self, ids: Any) -> Any:
        return (ids >= self.sentinel_start) & (ids < self.sentinel_end)

    def image_code(self, ids: Any) -> Any:
        """Vocabulary id -> VQ code index (0 .. image_codes-1)."""
        return ids - self.image_start

    def image_id(self, codes: Any) -> Any:
        """VQ code index -> vocabulary id."""
        return codes + self.image_start

    # ---- symbols (fairseq/metaseq Dictionary) ----------------------------------------------
    def symbols(self) -> list[str]:
        """One string per id, in id order, for building a host Dictionary."""
        if self.text_specials is not None:  # a host Dictionary puts its own four specials at 0..3
            raise ValueError("a vocabulary kept as an imported LLM's (text_specials) has no fairseq/metaseq "
                             "Dictionary yet (issue 28 phase 2)")
        out = ["<s>", "<pad>", "</s>", "<unk>"]
        out += [f"<t{i}>" for i in range(self.text_size)]
        out += [f"<img{i}>" for i in range(self.image_codes)]
        out += ["<break>"]
        out += [f"<mask:{i}>" for i in range(self.num_sentinels)]
        out += ["<eoss>"]
        if self.conversation_tokens:
            out += list(CONVERSATION_SYMBOLS)
        out += [f"madeupword{i:04d}" for i in range(self.size - self.num_used)]
        assert len(out) == self.size
        return out

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_grid"] = list(self.image_grid)
        if not self.conversation_tokens:
            del d["conversation_tokens"]  # manifests without them stay byte-identical
        if self.text_specials is None:
            del d["text_specials"]  # likewise
        else:
            d["text_specials"] = dict(zip(SPECIAL_NAMES, self.text_specials))
        d["version"] = MANIFEST_VERSION
        d["ids"] = {
            "bos": self.bos, "pad": self.pad, "eos": self.eos, "unk": self.unk,
            "break": self.break_id, "eoss": self.eoss, "mask": self.mask_id,
            "text": [self.text_start, self.text_end],
            "image": [self.image_start, self.image_end],
            "sentinels": [self.sentinel_start, self.sentinel_end],
            "size": self.size,
        }
        if self.conversation_tokens:
            d["ids"].update(user=self.user_id, assistant=self.assistant_id, eot=self.eot)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "<dict>") -> "VocabManifest":
        if not isinstance(d, dict):
            raise FieldError(f"{source}: a vocab manifest must be an object, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("version", MANIFEST_VERSION)
        if version != MANIFEST_VERSION or isinstance(version, bool):
            raise FieldError(f"{source}: vocab manifest version {version!r}, expected {MANIFEST_VERSION}")
        ids = d.pop("ids", None)
        if ids is not None and not isinstance(ids, dict):
            raise FieldError(f"{source}: vocab manifest 'ids' must be an object, got {type(ids).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise FieldError(f"{source}: unknown vocab manifest fields {sorted(unknown)}")
        if "text_size" not in d:
            raise FieldError(f"{source}: vocab manifest has no 'text_size'")
        m = cls.__new__(cls)  # fields checked with the file's name before __init__ checks them again
        for f in dataclasses.fields(cls):
            object.__setattr__(m, f.name, d.get(f.name, f.default))
        _check_fields(m, source=source)
        m = cls(**{f.name: getattr(m, f.name) for f in dataclasses.fields(cls)})
        for key, want in m.to_dict()["ids"].items():  # the recorded ids must be the ones the fields give
            if ids is not None and key in ids and ids[key] != want:
                raise FieldError(f"{source}: field 'ids.{key}' is {ids[key]!r} but the manifest's fields give {want}")
        return m

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file + rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "VocabManifest":
        return cls.from_dict(read_json(path, what="vocab manifest"), source=str(path))

    def check_embedding(self, num_rows: int, *, what: str = "checkpoint") -> None:
        """Stop when a model's embedding does not fit this manifest (``check_embedding``)."""
        check_embedding(self.size, num_rows, what=what)


def check_embedding(ids: int, rows: int, *, what: str = "checkpoint") -> None:
    """The one vocabulary-vs-embedding check: a vocabulary of ``ids`` ids (a manifest's ``size``, or
    the host dictionary built from it) fits a model whose embedding has ``rows`` rows only when the
    two are equal. ``what`` names the model (``the {what}'s embedding``)."""
    if rows != ids:
        raise ValueError(f"vocab manifest has {ids} ids but the {what}'s embedding has {rows} rows")


Stored = Union[Mapping[str, Any], VocabManifest, Callable[[], Union[Mapping[str, Any], VocabManifest, None]], None]
"""What ``find_vocab`` takes as a stored manifest."""


def stored_in(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The manifest a checkpoint stores, from its top-level entries (``meta``): ``CHECKPOINT_KEY``
    (jam-ckpt, ``eval.io``), else a host-trained checkpoint's ``task_state[TASK_STATE_KEY]``."""
    d = meta.get(CHECKPOINT_KEY)
    task_state = meta.get("task_state")
    if d is None and isinstance(task_state, Mapping):
        d = task_state.get(TASK_STATE_KEY)
    return d


def find_vocab(*, given: VocabManifest | str | os.PathLike | None = None, stored: Stored = None,
               beside: str | os.PathLike | None = None, source: str = "checkpoint") -> VocabManifest | None:
    """The one vocabulary lookup (of a checkpoint, or of a data directory): ``given`` (a manifest or
    its JSON file: ``--vocab``, a data directory's own ``vocab.json``) wins; else the manifest stored
    with it (``stored``: a manifest as ``to_dict()``, a ``VocabManifest``, or a function returning
    either, called only when nothing is given); else ``FILE_NAME`` in the directory ``beside``.
    None when there is none. Errors name the file (``source``: what ``stored`` came from)."""
    if given is not None:
        return given if isinstance(given, VocabManifest) else VocabManifest.load(given)
    found = stored() if callable(stored) else stored
    if isinstance(found, VocabManifest):
        return found
    if found is not None:
        return VocabManifest.from_dict(found, source=source)
    if beside is not None and (Path(beside) / FILE_NAME).is_file():
        return VocabManifest.load(Path(beside) / FILE_NAME)
    return None


def tiny_manifest(text_size: int = 64, image_codes: int = 32, image_grid: tuple[int, int] = (2, 2),
                  num_sentinels: int = 4, conversation_tokens: bool = False) -> VocabManifest:
    """A small layout for tests and the quickstart."""
    return VocabManifest(
        text_size=text_size, image_codes=image_codes, num_sentinels=num_sentinels,
        image_tokens_per_image=image_grid[0] * image_grid[1], image_grid=image_grid,
        conversation_tokens=conversation_tokens,
    )


def as_array(ids: Any) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64)

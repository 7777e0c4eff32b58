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

from jam_metaseq.errors import read_json

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
        if self.text_size < 0 or self.image_codes < 0:
            raise ValueError("text_size and image_codes must be >= 0")
        if self.num_sentinels < 1:
            raise ValueError("num_sentinels must be >= 1 (<mask:0> is the CFG mask)")
        if self.text_specials is not None:
            sp = self.text_specials
            if isinstance(sp, Mapping):
                if set(sp) != set(SPECIAL_NAMES):
                    raise ValueError(f"text_specials needs exactly {', '.join(SPECIAL_NAMES)}; got {sorted(sp)}")
                sp = tuple(sp[k] for k in SPECIAL_NAMES)
            if len(sp) != len(SPECIAL_NAMES) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.text_size for i in sp):
                raise ValueError(f"text_specials {list(sp)}: four ids (bos, pad, eos, unk) of the text range "
                                 f"[0, {self.text_size})")
            object.__setattr__(self, "text_specials", tuple(sp))
        grid = tuple(int(g) for g in self.image_grid)
        object.__setattr__(self, "image_grid", grid)
        if grid[0] * grid[1] != self.image_tokens_per_image:
            raise ValueError(
                f"image_grid {grid} does not hold image_tokens_per_image={self.image_tokens_per_image}"
            )

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
            raise ValueError(f"{source}: a vocab manifest must be an object, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("version", MANIFEST_VERSION)
        if version != MANIFEST_VERSION:
            raise ValueError(f"{source}: vocab manifest version {version}, expected {MANIFEST_VERSION}")
        ids = d.pop("ids", None)
        if ids is not None and not isinstance(ids, dict):
            raise ValueError(f"{source}: vocab manifest 'ids' must be an object, got {type(ids).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"{source}: unknown vocab manifest fields {sorted(unknown)}")
        if "text_size" not in d:
            raise ValueError(f"{source}: vocab manifest has no 'text_size'")
        try:
            m = cls(**d)
        except (TypeError, ValueError) as e:  # a field of the wrong type or value
            raise ValueError(f"{source}: bad vocab manifest ({e})") from None
        if ids is not None and ids.get("size", m.size) != m.size:
            raise ValueError(f"{source}: manifest says size {ids['size']} but its fields give {m.size}")
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

    # ---- growing a manifest --------------------------------------------------------------------
    def layout_differences(self, old: "VocabManifest") -> list[str]:
        """The fields, besides ``conversation_tokens`` and the informational ``text_tokenizer``, in
        which this manifest and ``old`` differ (sorted); empty when every id below
        ``old.num_used`` means the same in both."""
        skip = ("conversation_tokens", "text_tokenizer")
        return sorted(f.name for f in dataclasses.fields(self)
                      if f.name not in skip and getattr(self, f.name) != getattr(old, f.name))

    def extends(self, old: "VocabManifest") -> bool:
        """This manifest is ``old``, or ``old`` with the conversation tokens added: every id of
        ``old`` means the same here (a checkpoint of ``old`` takes this one through
        ``jam_metaseq.vocab_rows``; data tokenized with ``old`` reads the same under it)."""
        return not self.layout_differences(old) and (self.conversation_tokens or not old.conversation_tokens)

    def with_conversation_tokens(self) -> "VocabManifest":
        """This manifest with ``<user>``, ``<assistant>`` and ``<eot>`` (itself when it has them)."""
        return self if self.conversation_tokens else dataclasses.replace(self, conversation_tokens=True)

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

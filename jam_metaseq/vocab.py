"""The vocabulary layout shared by data, checkpoints, trainer and generator (paper §3.1 Tokenizers).

One JSON manifest describes every id:
  [bos=0, pad=1, eos=2, unk=3]  fairseq/metaseq Dictionary specials
  [text_start, text_end)        text tokenizer ids, shifted by text_start
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

That layout is ours (parents trained with this project). An imported parent (an HF Llama, Qwen2 or
Gemma: issue 23) keeps its tokenizer's ids, so its manifest names every id explicitly
(``explicit_ids``, ``TokenIds``; ``"layout": "explicit"`` in the JSON): bos/pad/eos/unk where its
tokenizer put them, the text range (tokenizer ids, unshifted: ``text_start`` is usually 0), the
image codes' range, and which of its reserved ids serve as ``<break>``, the CM3 sentinels (one
consecutive run) and ``<eoss>`` (Gemma's ``<unused*>``, Llama-3's ``<|reserved_special_token_*|>``,
Qwen2's embedding rows beyond its tokenizer). Where a parent's embedding lacks rows the manifest
uses (Gemma next to Liquid's image codes), ``extends`` names them and ``jam-ckpt`` adds them by a
``jam_metaseq.vocab_rows`` rule as it reads the parent (docs/FAMILIES.md). Every consumer reads ids
through this class, so both layouts work everywhere.

A Chameleon-family parent (Chameleon, Anole, Lumina-mGPT: issue 24) is such an imported parent with
two more facts its ``config.json``'s ``vocabulary_map`` states (``hf_families.chameleon.manifest_from_hf``):
its image codes are not in code order (``TokenIds.image_map``: code c is id ``image_map[c]``, a
permutation of one run of ids), and an image is framed by two different ids, begin (``<break>``'s
place: ``boi``) and end (``eoi``, Chameleon's ``<eoss>``, which is not our CM3 end-of-span). Consumers
ask ``image_id`` / ``image_code`` / ``is_image`` and ``boi`` / ``eoi``, never ``image_start + code``
or ``break_id`` for an image's frame.
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
"""The four specials every vocabulary names (fairseq's order: ids 0..3 in our layout)."""
CONVERSATION_SYMBOLS = ("<user>", "<assistant>", "<eot>")
NUM_CONVERSATION_TOKENS = len(CONVERSATION_SYMBOLS)
MANIFEST_VERSION = 1
LAYOUT_EXPLICIT = "explicit"
"""``"layout"`` of a manifest whose ids are given (``TokenIds``), not derived from the sizes."""
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
class TokenIds:
    """The ids of an imported parent's vocabulary, where its tokenizer put them (``VocabManifest.explicit_ids``)."""

    size: int
    """Rows of the embedding (every id is below it)."""
    bos: int
    pad: int
    """The id masked as padding (``DecoderConfig.padding_idx``): one no text produces (Llama-2's
    ``<unk>``, Llama-3's ``<|reserved_special_token_2|>``, Gemma's ``<pad>``, Qwen2's ``<|endoftext|>``)."""
    eos: int
    unk: int
    text: tuple[int, int]
    """[start, end): the text tokenizer's ids, unshifted (the specials and reserved ids above may
    lie inside; ``is_text`` leaves them out)."""
    image: tuple[int, int]
    """[start, end): the image codes (code c is id start + c, unless ``image_map``); empty (start == end)
    for a text-only parent."""
    break_id: int
    """``<break>``, framing every image (opening it where ``eoi`` closes it)."""
    sentinels: tuple[int, int]
    """[start, end): the CM3 sentinels ``<mask:0>`` ... (one consecutive run of reserved ids)."""
    eoss: int
    """``<eoss>``, closing each moved span."""
    extends: tuple[int, int] | None = None
    """[start, size): rows a parent's embedding of ``start`` rows lacks; ``jam-ckpt`` adds them as it
    reads that parent, each by the ``vocab_rows`` rule ``extend_init``. None: every parent has ``size`` rows."""
    extend_init: str = "text_mean"
    """The ``jam_metaseq.vocab_rows.ROW_INIT_RULES`` rule of the ``extends`` rows."""
    image_map: tuple[int, ...] | None = None
    """Code c -> id ``image_map[c]`` (Chameleon's ``IMGIMG*`` entries: not in code order); a
    permutation of the ids of ``image``, which it then spans (every range consumer, the decoding
    mask and JAM-Cross's image rows, stays right). None: code c is id ``image[0] + c``."""
    eoi: int | None = None
    """The id closing an image when it is not ``<break>`` (Chameleon: its ``<eoss>``, 8196, after
    ``<racm3:break>``, 8197, opened it). None: ``<break>`` on both sides, our layout."""

    def __post_init__(self) -> None:
        if self.image_map is not None:
            m = self.image_map
            if not (isinstance(m, (list, tuple)) and m and all(_is_int(x) for x in m)):
                raise ValueError("ids.image_map must be a non-empty list of integer ids (code c -> id image_map[c])")
            m = tuple(int(x) for x in m)
            lo = min(m)
            if sorted(m) != list(range(lo, lo + len(m))):
                raise ValueError(f"ids.image_map must be a permutation of one run of ids; its {len(m)} ids span "
                                 f"[{lo}, {max(m) + 1}) with gaps or repeats")
            object.__setattr__(self, "image_map", m)
            object.__setattr__(self, "image", (lo, lo + len(m)))
        for name in ("text", "image", "sentinels", "extends"):
            v = getattr(self, name)
            if v is None and name == "extends":
                continue
            if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) for x in v)):
                raise ValueError(f"ids.{name} must be [start, end] integers, got {v!r}")
            object.__setattr__(self, name, (int(v[0]), int(v[1])))
        for name in ("size", "bos", "pad", "eos", "unk", "break_id", "eoss", *(("eoi",) if self.eoi is not None else ())):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"ids.{_JSON_NAME.get(name, name)} must be an integer, got {getattr(self, name)!r}")
        n = self.size
        if n < 1:
            raise ValueError(f"ids.size must be >= 1, got {n}")
        for name in ("bos", "pad", "eos", "unk", "break_id", "eoss", *(("eoi",) if self.eoi is not None else ())):
            if not 0 <= getattr(self, name) < n:
                raise ValueError(f"ids.{_JSON_NAME.get(name, name)} {getattr(self, name)} is not an id below size {n}")
        for name in ("text", "image", "sentinels"):
            a, b = getattr(self, name)
            if not 0 <= a <= b <= n:
                raise ValueError(f"ids.{name} [{a}, {b}) does not fit the {n} ids")
        if self.sentinels[0] == self.sentinels[1]:
            raise ValueError("ids.sentinels is empty: the CM3 objective needs at least one sentinel (<mask:0>, "
                             "also the CFG mask)")
        if self.pad in (self.bos, self.eos):
            raise ValueError(f"ids.pad {self.pad} is also bos or eos: padding is masked, they are not")
        named = {"break": self.break_id, "eoss": self.eoss, "bos": self.bos, "pad": self.pad, "eos": self.eos}
        if self.eoi is not None:
            named["eoi"] = self.eoi
            if self.eoi in (self.break_id, self.eoss):
                raise ValueError(f"ids.eoi {self.eoi} is also break or eoss (leave eoi out when <break> closes images)")
        for what, i in named.items():
            if self.image[0] <= i < self.image[1]:
                raise ValueError(f"ids.{what} {i} is inside the image range {list(self.image)}")
            if self.sentinels[0] <= i < self.sentinels[1]:
                raise ValueError(f"ids.{what} {i} is inside the sentinel range {list(self.sentinels)}")
        if self.break_id == self.eoss:
            raise ValueError(f"ids.break and ids.eoss are both {self.eoss}")
        if max(self.image[0], self.sentinels[0]) < min(self.image[1], self.sentinels[1]):
            raise ValueError(f"ids.sentinels {list(self.sentinels)} overlap the image range {list(self.image)}")
        if self.extends is not None and not 0 < self.extends[0] < self.extends[1] == n:
            raise ValueError(f"ids.extends {list(self.extends)} must be [rows of the smaller embedding, size={n}]")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"bos": self.bos, "pad": self.pad, "eos": self.eos, "unk": self.unk,
                             "break": self.break_id, "eoss": self.eoss, "mask": self.sentinels[0],
                             "text": list(self.text), "image": list(self.image),
                             "sentinels": list(self.sentinels), "size": self.size}
        if self.eoi is not None:
            d["eoi"] = self.eoi
        if self.image_map is not None:  # the map replaces the range (which it spans)
            del d["image"]
            d["image_map"] = list(self.image_map)
        if self.extends is not None:
            d["extends"] = {"rows": list(self.extends), "init": self.extend_init}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str) -> "TokenIds":
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: an explicit vocab manifest needs an 'ids' object")
        d = dict(d)
        mask = d.pop("mask", None)
        ext = d.pop("extends", None)
        if "image_map" in d:
            if "image" in d:
                raise ValueError(f"{source}: ids has both image and image_map (the map replaces the range)")
            d["image"] = [0, 0]  # spanned by the map (TokenIds.__post_init__)
        want = ("bos", "pad", "eos", "unk", "break", "eoss", "text", "image", "sentinels", "size")
        missing = [k for k in want if k not in d]
        if missing:
            raise ValueError(f"{source}: ids has no {', '.join(missing)} (an explicit manifest names every id)")
        extra = sorted(set(d) - set(want) - {"image_map", "eoi"})
        if extra:
            raise ValueError(f"{source}: unknown ids fields {extra}")
        kw: dict[str, Any] = {_FIELD_NAME.get(k, k): v for k, v in d.items()}
        if ext is not None:
            if not isinstance(ext, Mapping) or "rows" not in ext or set(ext) - {"rows", "init"}:
                raise ValueError(f"{source}: ids.extends must be {{\"rows\": [start, size], \"init\": RULE}}")
            kw["extends"], kw["extend_init"] = ext["rows"], ext.get("init", "text_mean")
        try:
            ids = cls(**kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: bad explicit vocab manifest ({e})") from None
        if mask is not None and mask != ids.sentinels[0]:
            raise ValueError(f"{source}: ids.mask {mask} must be the first sentinel {ids.sentinels[0]}")
        return ids


_FIELD_NAME = {"break": "break_id"}
_JSON_NAME = {"break_id": "break"}


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


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
    explicit_ids: TokenIds | None = None
    """An imported parent's ids, where its tokenizer put them (module docstring); None: our layout,
    every id derived from the sizes above. ``text_size``, ``image_codes`` and ``num_sentinels``
    then equal its ranges' lengths (``imported`` fills them)."""

    def __post_init__(self) -> None:
        x = self.explicit_ids
        if x is not None:
            if isinstance(x, Mapping):
                x = TokenIds.from_dict(x, source="explicit_ids")
                object.__setattr__(self, "explicit_ids", x)
            got = (self.text_size, self.image_codes, self.num_sentinels)
            want = (x.text[1] - x.text[0], x.image[1] - x.image[0], x.sentinels[1] - x.sentinels[0])
            if got != want:
                raise ValueError(f"text_size, image_codes, num_sentinels {got} differ from the explicit ids' ranges "
                                 f"{want}")
            if self.conversation_tokens:
                raise ValueError("conversation tokens of an explicit (imported) vocabulary are not supported yet")
        _check_fields(self, source="vocab manifest")  # num_sentinels >= 1: <mask:0> is the CFG mask

    @classmethod
    def imported(cls, ids: TokenIds, **fields: Any) -> "VocabManifest":
        """The manifest of an imported parent whose ids are ``ids`` (``fields``: ``image_grid``,
        ``image_tokens_per_image``, ``text_tokenizer``); the sizes follow from its ranges."""
        return cls(text_size=ids.text[1] - ids.text[0], image_codes=ids.image[1] - ids.image[0],
                   num_sentinels=ids.sentinels[1] - ids.sentinels[0], explicit_ids=ids, **fields)

    @classmethod
    def after_text(cls, text_size: int, *, specials: Mapping[str, int], image_codes: int = 8192,
                   num_sentinels: int = 16, pad_to_multiple: int = 8, conversation_tokens: bool = False,
                   **fields: Any) -> "VocabManifest":
        """An imported text LLM's ids kept as they are ([0, text_size), its own ``specials`` bos, pad,
        eos and unk among them), then our layout after them: image codes, ``<break>``, sentinels,
        ``<eoss>`` and filler rows up to ``pad_to_multiple`` (a GGUF's tokenizer,
        ``checkpoints_tools/gguf_tokenizer.py``). An explicit-ids manifest like any imported parent's."""
        if conversation_tokens:
            raise ValueError("conversation tokens of an explicit (imported) vocabulary are not supported yet")
        missing = [k for k in SPECIAL_NAMES if k not in specials]
        if missing:
            raise ValueError(f"the text specials name no {', '.join(missing)}")
        for k in SPECIAL_NAMES:
            if not (_is_int(specials[k]) and 0 <= specials[k] < text_size):
                raise ValueError(f"the text special {k}={specials[k]!r} is not an id of the {text_size} text ids")
        if not (_is_int(pad_to_multiple) and pad_to_multiple >= 1):
            raise ValueError(f"pad_to_multiple must be an integer >= 1, got {pad_to_multiple!r}")
        img = (text_size, text_size + image_codes)
        sent = (img[1] + 1, img[1] + 1 + num_sentinels)
        used = sent[1] + 1
        size = -(-used // pad_to_multiple) * pad_to_multiple
        ids = TokenIds(size=size, bos=specials["bos"], pad=specials["pad"], eos=specials["eos"], unk=specials["unk"],
                       text=(0, text_size), image=img, break_id=img[1], sentinels=sent, eoss=sent[1])
        return cls.imported(ids, pad_to_multiple=pad_to_multiple, **fields)

    # ---- ids -------------------------------------------------------------------------------
    @property
    def bos(self) -> int:
        return BOS if self.explicit_ids is None else self.explicit_ids.bos

    @property
    def pad(self) -> int:
        return PAD if self.explicit_ids is None else self.explicit_ids.pad

    @property
    def eos(self) -> int:
        return EOS if self.explicit_ids is None else self.explicit_ids.eos

    @property
    def unk(self) -> int:
        return UNK if self.explicit_ids is None else self.explicit_ids.unk

    @property
    def text_start(self) -> int:
        return NUM_DICT_SPECIALS if self.explicit_ids is None else self.explicit_ids.text[0]

    @property
    def text_end(self) -> int:
        return self.text_start + self.text_size

    @property
    def image_start(self) -> int:
        return self.text_end if self.explicit_ids is None else self.explicit_ids.image[0]

    @property
    def image_end(self) -> int:
        return self.image_start + self.image_codes

    @property
    def break_id(self) -> int:
        return self.image_end if self.explicit_ids is None else self.explicit_ids.break_id

    @property
    def boi(self) -> int:
        """The id opening an image (``<break>``; Chameleon's ``<racm3:break>``)."""
        return self.break_id

    @property
    def eoi(self) -> int:
        """The id closing an image (``<break>`` in our layout; Chameleon's ``<eoss>``: ``TokenIds.eoi``)."""
        x = self.explicit_ids
        return self.break_id if x is None or x.eoi is None else x.eoi

    def is_frame(self, ids: Any) -> Any:
        """``boi`` or ``eoi``: an image's frame (CM3 spans never cross one)."""
        return (ids == self.boi) | (ids == self.eoi)

    @property
    def sentinel_start(self) -> int:
        return self.break_id + 1 if self.explicit_ids is None else self.explicit_ids.sentinels[0]

    @property
    def sentinel_end(self) -> int:
        return self.sentinel_start + self.num_sentinels

    @property
    def mask_id(self) -> int:
        """The CFG ``<mask>`` (= ``<mask:0>``)."""
        return self.sentinel_start

    @property
    def eoss(self) -> int:
        return self.sentinel_end if self.explicit_ids is None else self.explicit_ids.eoss

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
        if self.explicit_ids is not None:
            return self.explicit_ids.size  # every row is an id of the parent's tokenizer or named here
        return self.eoss + 1 + (NUM_CONVERSATION_TOKENS if self.conversation_tokens else 0)

    @property
    def size(self) -> int:
        if self.explicit_ids is not None:
            return self.explicit_ids.size
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
        inside = (ids >= self.text_start) & (ids < self.text_end)
        if self.explicit_ids is None:
            return inside
        x = self.explicit_ids  # the text range of an imported tokenizer holds its specials and reserved ids
        for i in (x.bos, x.pad, x.eos, x.unk, x.break_id, x.eoss, *(() if x.eoi is None else (x.eoi,))):
            inside = inside & (ids != i)
        inside = inside & ((ids < x.sentinels[0]) | (ids >= x.sentinels[1]))
        if x.image[0] < x.image[1] and x.text[0] < x.image[1] and x.image[0] < x.text[1]:
            inside = inside & ~self.is_image(ids)  # Chameleon's codes sit among its BPE ids
        return inside

    def is_sentinel(self, ids: Any) -> Any:
        return (ids >= self.sentinel_start) & (ids < self.sentinel_end)

    def image_code(self, ids: Any) -> Any:
        """Vocabulary id -> VQ code index (0 .. image_codes-1); ints, numpy or torch arrays."""
        m = self._image_tables()
        return ids - self.image_start if m is None else _lookup(m[1], ids - self.image_start)

    def image_id(self, codes: Any) -> Any:
        """VQ code index -> vocabulary id; ints, numpy or torch arrays."""
        m = self._image_tables()
        return codes + self.image_start if m is None else _lookup(m[0], codes)

    def _image_tables(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(code -> id, id - image_start -> code) of an ``image_map``; None: code c is id start + c."""
        x = self.explicit_ids
        if x is None or x.image_map is None:
            return None
        got = self.__dict__.get("_tables")
        if got is None:
            ids = np.asarray(x.image_map, dtype=np.int64)
            codes = np.empty_like(ids)
            codes[ids - x.image[0]] = np.arange(len(ids))
            got = (ids, codes)
            object.__setattr__(self, "_tables", got)
        return got

    # ---- symbols (fairseq/metaseq Dictionary) ----------------------------------------------
    def symbols(self) -> list[str]:
        """One string per id, in id order, for building a host Dictionary."""
        if self.explicit_ids is not None:
            return self._explicit_symbols()
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

    def _explicit_symbols(self) -> list[str]:
        x = self.explicit_ids
        out = [f"<t{i - self.text_start}>" if self.text_start <= i < self.text_end else f"<row{i}>"
               for i in range(x.size)]
        for c in range(self.image_codes):
            out[int(self.image_id(c))] = f"<img{c}>"
        for k in range(self.num_sentinels):
            out[self.sentinel_start + k] = f"<mask:{k}>"
        out[x.break_id], out[x.eoss] = "<break>", "<eoss>"
        if x.eoi is not None:
            out[x.eoi] = "<eoi>"
        for i, sym in ((x.unk, "<unk>"), (x.eos, "</s>"), (x.pad, "<pad>"), (x.bos, "<s>")):
            out[i] = sym  # pad wins over unk where a tokenizer has one id for both (Llama-2's <unk>)
        return out

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_grid"] = list(self.image_grid)
        if not self.conversation_tokens:
            del d["conversation_tokens"]  # manifests without them stay byte-identical
        del d["explicit_ids"]
        if self.explicit_ids is not None:  # the ids below are the manifest, not a summary of it
            d["layout"] = LAYOUT_EXPLICIT
            d["version"] = MANIFEST_VERSION
            d["ids"] = self.explicit_ids.to_dict()
            return d
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
        layout = d.pop("layout", None)
        if layout not in (None, LAYOUT_EXPLICIT):
            raise ValueError(f"{source}: vocab manifest layout {layout!r}; expected {LAYOUT_EXPLICIT!r} or none")
        if "explicit_ids" in d:
            raise ValueError(f"{source}: unknown vocab manifest fields ['explicit_ids'] (write \"layout\": "
                             f"\"{LAYOUT_EXPLICIT}\" and the ids under \"ids\")")
        if layout == LAYOUT_EXPLICIT:
            d["explicit_ids"] = TokenIds.from_dict(ids, source=source)
            x = d["explicit_ids"]
            d.setdefault("text_size", x.text[1] - x.text[0])
            d.setdefault("image_codes", x.image[1] - x.image[0])
            d.setdefault("num_sentinels", x.sentinels[1] - x.sentinels[0])
            ids = None
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


def _lookup(table: np.ndarray, i: Any) -> Any:
    """``table[i]`` for an int, a numpy array or a torch tensor ``i`` (the result of ``i``'s kind)."""
    if isinstance(i, np.ndarray):
        return table[i]
    if hasattr(i, "device") and hasattr(i, "dim"):  # a torch tensor (torch is not imported here)
        import torch

        return torch.as_tensor(table, device=i.device)[i]
    return int(table[int(i)])


def as_array(ids: Any) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64)

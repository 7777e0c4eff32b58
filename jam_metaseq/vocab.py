"""The vocabulary layout shared by data, checkpoints, trainer and generator (paper §3.1 Tokenizers).

One JSON manifest describes every id:
  [bos=0, pad=1, eos=2, unk=3]  fairseq/metaseq Dictionary specials
  [text_start, text_end)        text tokenizer ids, shifted by text_start
  [image_start, image_end)      image codes (default 8192: a 32x32 VQ grid per image)
  break                         <break>, framing every image: <break> img_0 .. img_1023 <break>
  [sentinel_start, +num_sentinels)  CM3 sentinels <mask:0> ... <mask:K-1>
  eoss                          end-of-span token closing each moved span
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
from typing import Any

import numpy as np

from jam_metaseq.inputs import FieldError, int_field, read_json, str_field

BOS, PAD, EOS, UNK = 0, 1, 2, 3
NUM_DICT_SPECIALS = 4
MANIFEST_VERSION = 1
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

    def __post_init__(self) -> None:
        _check_fields(self, source="vocab manifest")  # num_sentinels >= 1: <mask:0> is the CFG mask

    # ---- ids -------------------------------------------------------------------------------
    bos = BOS
    pad = PAD
    eos = EOS
    unk = UNK

    @property
    def text_start(self) -> int:
        return NUM_DICT_SPECIALS

    @property
    def text_end(self) -> int:
        return NUM_DICT_SPECIALS + self.text_size

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
    def num_used(self) -> int:
        return self.eoss + 1

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
        out = ["<s>", "<pad>", "</s>", "<unk>"]
        out += [f"<t{i}>" for i in range(self.text_size)]
        out += [f"<img{i}>" for i in range(self.image_codes)]
        out += ["<break>"]
        out += [f"<mask:{i}>" for i in range(self.num_sentinels)]
        out += ["<eoss>"]
        out += [f"madeupword{i:04d}" for i in range(self.size - self.num_used)]
        assert len(out) == self.size
        return out

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_grid"] = list(self.image_grid)
        d["version"] = MANIFEST_VERSION
        d["ids"] = {
            "bos": self.bos, "pad": self.pad, "eos": self.eos, "unk": self.unk,
            "break": self.break_id, "eoss": self.eoss, "mask": self.mask_id,
            "text": [self.text_start, self.text_end],
            "image": [self.image_start, self.image_end],
            "sentinels": [self.sentinel_start, self.sentinel_end],
            "size": self.size,
        }
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
        """Stop when a model's embedding does not fit this manifest, saying both sizes."""
        if num_rows != self.size:
            raise ValueError(
                f"vocab manifest has {self.size} ids but the {what}'s embedding has {num_rows} rows"
            )


def tiny_manifest(text_size: int = 64, image_codes: int = 32, image_grid: tuple[int, int] = (2, 2),
                  num_sentinels: int = 4) -> VocabManifest:
    """A small layout for tests and the quickstart."""
    return VocabManifest(
        text_size=text_size, image_codes=image_codes, num_sentinels=num_sentinels,
        image_tokens_per_image=image_grid[0] * image_grid[1], image_grid=image_grid,
    )


def as_array(ids: Any) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64)

"""Training and validation items of the ``cm3_multimodal`` task, and their batches (JAM §3.1
Objective, Training): ``CM3Items`` (map-style items of one split), ``collate``, ``TaskOptions``.

Host-free: the fairseq and metaseq adapters (``jam_metaseq.hosts``) wrap these in their dataset
classes, and a plain PyTorch loop can use them as they are.

Data directory layout (``DATA``, the task's positional argument)::

    DATA/vocab.json                 optional; else the manifest stored with the binarized sources
    DATA/{split}/{source}.json ...  one ``jam-data binarize`` output per source (prefix {source})
    DATA/{split}/{source}.neighbours.npy   optional (B, k) int64 memory-bank rows per block, -1 = none
                                          (``jam-retrieval neighbours BANK --dataset DATA/{split}/{source}``)

Training items of epoch e: ``epoch_items`` blocks drawn from the sources by ``MixtureStream``
(token-balanced to the ``--mixture`` weights, seeded by (seed, e)); item i is CM3-transformed with
``np.random.default_rng([seed, e, i])``, so an item is the same whichever worker, process or resumed
run builds it. Validation items are every block of every source once, in order, untransformed
(plain -log p(x), the PPL of Tables 1-5) unless ``cm3_on_valid``.

Retrieval augmentation (§3.1, RA-CM3/CM3leon), with ``--retrieval-bank BANK``: the block of an
item whose source has a ``.neighbours.npy`` (checked against the block count and the bank's size
when the split loads) becomes ``[bos] r_1 <eos> ... r_k <eos> block`` before the CM3 transform,
r_i = the first ``--retrieval-k`` bank rows of the block, best first (``retrieval/prefix.py``
layout). Truncation so the item fits T + 1 tokens: room = T + 1 - 3 * max_spans when the item is
CM3-transformed (each span adds 3 tokens), else T + 1; the block keeps its first room - 1 tokens
and the retrieved documents fill what is left (whole documents in rank order, then one cut that
splits no image, then nothing). Prefix tokens get loss weight ``--retrieval-weight``. A block
that already fills the context leaves no room: binarize retrieval-augmented sources with
``--break-mode eos`` and a block size well below T. Bank row i must be document i of the source's
JSONL files (``jam-retrieval neighbours --dataset`` checks it).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from jam_metaseq.data.binarize import TokenBlockDataset, open_dataset
from jam_metaseq.data.mixture import MixtureStream
from jam_metaseq.objectives.cm3 import CM3Config, cm3_transform, item_rng
from jam_metaseq.vocab import FILE_NAME, VocabManifest, find_vocab

logger = logging.getLogger(__name__)


class DataSetupError(ValueError):
    """A data directory that cannot be used; the message names the path."""


@dataclass
class TaskOptions:
    """What the cm3_multimodal task needs, independent of how a host parses it."""

    data: str
    """Data directory (layout in the module docstring)."""
    tokens_per_sample: int = 2048
    """Model input length T (items are T + 1 tokens before the input/target shift)."""
    mixture: dict[str, float] | None = None
    """Source name -> weight for training (None = every source, equal weights)."""
    cm3: CM3Config = field(default_factory=CM3Config)
    """CM3 transform options (sentinel weighting is the criterion's: the transform uses 1)."""
    cm3_on_valid: bool = False
    """Also CM3-transform validation items (default: plain LM, as PPL is reported)."""
    instruction: bool = False
    """Instruction mode: train only on tokens the data's loss mask marks (the responses)."""
    seed: int = 1
    """Base seed of the mixture order and the CM3 transform."""
    epoch_items: int = 0
    """Training items per epoch (0 = the total number of blocks over all sources)."""
    retrieval_bank: str | None = None
    """Memory bank (``jam-retrieval`` output) whose documents are prefixed to items with neighbours."""
    retrieval_k: int = 2
    """Retrieved documents prefixed per item at most."""
    retrieval_weight: float = 0.0
    """Loss weight of the retrieved prefix tokens (RA-CM3 used 0.1)."""

    def __post_init__(self) -> None:
        if self.tokens_per_sample < 2:
            raise ValueError(f"tokens_per_sample must be >= 2, got {self.tokens_per_sample}")
        if self.retrieval_k < 1:
            raise ValueError(f"retrieval_k must be >= 1, got {self.retrieval_k}")
        if not (self.retrieval_weight >= 0 and math.isfinite(self.retrieval_weight)):
            raise ValueError(f"retrieval_weight must be finite and >= 0, got {self.retrieval_weight}")
        if self.mixture is not None:
            bad = {k: v for k, v in self.mixture.items() if not (v > 0 and math.isfinite(v))}
            if bad:
                raise ValueError(f"mixture weights must be finite and > 0: {bad}")


def parse_mixture(text: str | None) -> dict[str, float] | None:
    """``"text=1,caption=1"`` -> ``{"text": 1.0, "caption": 1.0}``; empty/None -> None."""
    if not text:
        return None
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, weight = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--mixture entry {part!r} is not NAME=WEIGHT")
        try:
            out[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"--mixture weight of {name.strip()!r} is not a number: {weight!r}") from None
    return out


def find_sources(data: str | Path, split: str) -> dict[str, str]:
    """Binarized source prefixes of one split: ``{name: "DATA/split/name"}`` (sorted by name)."""
    d = Path(data) / split
    if not d.is_dir():
        raise DataSetupError(f"cm3_multimodal: no split directory {d}")
    names = sorted(p.name[: -len(".json")] for p in d.glob("*.json")
                   if not p.name.endswith(".vocab.json"))
    if not names:
        raise DataSetupError(f"cm3_multimodal: no binarized source (NAME.json) in {d}")
    return {n: str(d / n) for n in names}


def load_manifest(data: str | Path, *, train_subset: str = "train") -> VocabManifest:
    """``DATA/vocab.json``, else the manifest stored with the first source of any split."""
    root = Path(data)
    if not root.is_dir():
        raise DataSetupError(f"cm3_multimodal: data directory not found: {root}")

    def first_source() -> VocabManifest | None:
        splits = [train_subset] + sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != train_subset)
        for split in splits:
            if (root / split).is_dir():
                for prefix in find_sources(root, split).values():
                    return open_dataset(prefix).vocab
        return None

    given = root / FILE_NAME  # the data directory's own manifest
    found = find_vocab(given=given if given.is_file() else None, stored=first_source)
    if found is not None:
        return found
    raise DataSetupError(f"cm3_multimodal: {root} has neither vocab.json nor a split directory with sources")


def _mixture_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, 0x4A414D]).generate_state(1)[0])


class _SizesOnly:
    """A source seen by ``MixtureStream`` through its block sizes only (planning reads no tokens)."""

    def __init__(self, ds: TokenBlockDataset) -> None:
        self.sizes = ds.sizes

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"tokens": np.empty(int(self.sizes[i]), dtype=np.uint8)}


class CM3Items:
    """Map-style items ``{"id", "source" (T',), "target" (T',), "weights" (T',)}`` of one split."""

    def __init__(self, sources: Mapping[str, TokenBlockDataset], *, vocab: VocabManifest,
                 opts: TaskOptions, train: bool, epoch: int = 1) -> None:
        self.sources = dict(sources)
        self.names = list(self.sources)
        self.vocab = vocab
        self.opts = opts
        self.train = train
        self._bank = None
        self._neighbours: dict[str, np.ndarray | None] = {}
        if opts.retrieval_bank:
            self._check_retrieval()
        if train:
            mix = opts.mixture or {n: 1.0 for n in self.names}
            unknown = sorted(set(mix) - set(self.names))
            if unknown:
                raise DataSetupError(f"cm3_multimodal: --mixture names {unknown} but the sources are {self.names}")
            self.weights = {n: float(mix[n]) for n in self.names if n in mix}
            self.length = opts.epoch_items or sum(len(self.sources[n]) for n in self.weights)
        else:
            self.weights = {n: 1.0 for n in self.names}
            self.length = sum(len(s) for s in self.sources.values())
        self.epoch = -1
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Plan which block every item of ``epoch`` reads: arrays ``_src`` and ``_idx`` (N,)."""
        if epoch == self.epoch:
            return
        self.epoch = epoch
        if self.train:
            stream = MixtureStream({n: _SizesOnly(self.sources[n]) for n in self.weights}, self.weights,
                                   seed=_mixture_seed(self.opts.seed, epoch))
            src, idx = np.empty(self.length, np.int32), np.empty(self.length, np.int64)
            order = {n: k for k, n in enumerate(self.names)}
            for j in range(self.length):
                item = next(stream)
                src[j], idx[j] = order[item["source"]], item["index"]
        else:
            src = np.concatenate([np.full(len(self.sources[n]), k, np.int32) for k, n in enumerate(self.names)])
            idx = np.concatenate([np.arange(len(self.sources[n]), dtype=np.int64) for n in self.names])
        self._src, self._idx = src, idx

    def __len__(self) -> int:
        return self.length

    def size(self, i: int) -> int:
        """Every item is at most T tokens; batches are planned with this bound."""
        return self.opts.tokens_per_sample

    # memory maps (bank, neighbours) are not pickled into DataLoader workers: reopened on first use
    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_bank"] = None
        d["_neighbours"] = {}
        return d

    def _load_bank(self) -> Any:
        if self._bank is None:
            from jam_metaseq.retrieval.bank import MemoryBank

            try:
                self._bank = MemoryBank.load(self.opts.retrieval_bank)
            except (FileNotFoundError, ValueError, KeyError) as e:
                raise DataSetupError(f"cm3_multimodal: --retrieval-bank {self.opts.retrieval_bank}: {e}") from None
        return self._bank

    def _load_neighbours(self, name: str) -> np.ndarray | None:
        if name not in self._neighbours:
            from jam_metaseq.retrieval.retriever import load_block_neighbours

            ds = self.sources[name]
            try:
                self._neighbours[name] = load_block_neighbours(ds.prefix, num_blocks=len(ds),
                                                              bank_size=len(self._load_bank()))
            except ValueError as e:
                raise DataSetupError(f"cm3_multimodal: {e}") from None
        return self._neighbours[name]

    def _check_retrieval(self) -> None:
        """Fail at setup, not mid-epoch: the bank's vocabulary and every neighbours file must fit."""
        bank = self._load_bank()
        bv = bank.vocab
        if bv is not None and bv.to_dict() != self.vocab.to_dict():
            raise DataSetupError(f"cm3_multimodal: --retrieval-bank {bank.path} was built with a vocabulary "
                                 f"of {bv.size} ids, the data's has {self.vocab.size} (or their layouts differ)")
        found = [n for n in self.names if self._load_neighbours(n) is not None]
        logger.info(f"cm3_multimodal: retrieval prefixes from {bank.path} ({len(bank)} documents, k <= "
                    f"{self.opts.retrieval_k}, weight {self.opts.retrieval_weight}) for sources {found}")
        if self.train and not found:
            raise DataSetupError(
                f"cm3_multimodal: --retrieval-bank is set but no training source has a neighbours file "
                f"({', '.join(self.sources[n].prefix + '.neighbours.npy' for n in self.names)}): run "
                f"`jam-retrieval neighbours {self.opts.retrieval_bank} --dataset PREFIX`")

    def _retrieved(self, name: str, block: int) -> list[np.ndarray]:
        """Token arrays of the block's retrieved documents (at most ``retrieval_k``, best first)."""
        if not self.opts.retrieval_bank:
            return []
        nb = self._load_neighbours(name)
        if nb is None:
            return []
        bank = self._load_bank()
        rows = [int(r) for r in np.asarray(nb[block]).reshape(-1) if r >= 0][: self.opts.retrieval_k]
        return [bank.tokens(r) for r in rows]

    def __getitem__(self, i: int) -> dict[str, Any]:
        name = self.names[int(self._src[i])]
        block = int(self._idx[i])
        item = self.sources[name][block]
        tokens = item["tokens"]
        mask = item["loss_mask"] if self.opts.instruction else np.ones(tokens.size, dtype=bool)
        weights = mask.astype(np.float32)
        use_cm3 = self.train or self.opts.cm3_on_valid
        max_len = self.opts.tokens_per_sample + 1
        room = max_len - (3 * self.opts.cm3.max_spans if use_cm3 else 0)
        docs = self._retrieved(name, block) if room >= 3 else []
        if docs:  # truncation rule: module docstring
            from jam_metaseq.retrieval.prefix import prepend_retrieved

            tokens, is_prefix = prepend_retrieved(tokens[: room - 1], docs, vocab=self.vocab, context=room)
            w = np.ones(tokens.size, dtype=np.float32)
            w[~is_prefix] = weights[: int((~is_prefix).sum())]
            w[is_prefix] = self.opts.retrieval_weight
            weights = w
        if use_cm3:
            c = self.opts.cm3
            rng = item_rng(self.opts.seed, self.epoch if self.train else 0, int(i))
            tokens, weights = cm3_transform(
                tokens, rng, vocab=self.vocab, mode=c.mode, lam=c.lam, min_spans=c.min_spans,
                max_spans=c.max_spans, num_spans=c.num_spans, max_len=max_len, return_loss_weights=True,
                loss_mask=weights, sentinel_weight=1.0, cross_documents=c.cross_documents)
        else:
            tokens, weights = tokens[:max_len], weights[:max_len]
        tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        weights = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
        # input t predicts t+1; weights are target-aligned
        return {"id": int(i), "source": tokens[:-1], "target": tokens[1:], "weights": weights[1:]}


def collate(samples: Sequence[dict[str, Any]], *, pad: int) -> dict[str, Any]:
    """Right-pad items into a batch (pad targets get weight 0 and are masked as keys)."""
    if not samples:
        return {}
    n = max(s["source"].numel() for s in samples)
    B = len(samples)
    src = torch.full((B, n), pad, dtype=torch.long)
    tgt = torch.full((B, n), pad, dtype=torch.long)
    w = torch.zeros((B, n), dtype=torch.float32)
    for b, s in enumerate(samples):
        L = s["source"].numel()
        src[b, :L], tgt[b, :L], w[b, :L] = s["source"], s["target"], s["weights"]
    lengths = torch.tensor([s["source"].numel() for s in samples], dtype=torch.long)
    return {
        "id": torch.tensor([s["id"] for s in samples], dtype=torch.long),
        "nsentences": B,
        "ntokens": int(tgt.ne(pad).sum()),
        "net_input": {"src_tokens": src, "src_lengths": lengths},
        "target": tgt,
        "loss_weights": w,
    }

"""Host-free pieces of the ``cm3_multimodal`` task and ``cm3`` criterion (JAM §3.1 Objective/Training).

Both host adapters (fairseq, metaseq) wrap these; nothing here imports a host.

Data directory layout (``DATA``, the task's positional argument)::

    DATA/vocab.json                 optional; else the manifest stored with the binarized sources
    DATA/{split}/{source}.json ...  one ``jam-data binarize`` output per source (prefix {source})
    DATA/{split}/{source}.neighbors.npy   optional (B, k) int64 memory-bank rows per block, -1 = none
                                          (``jam-retrieval neighbours BANK --dataset DATA/{split}/{source}``)

Training items of epoch e: ``epoch_items`` blocks drawn from the sources by ``MixtureStream``
(token-balanced to the ``--mixture`` weights, seeded by (seed, e)); item i is CM3-transformed with
``np.random.default_rng([seed, e, i])``, so an item is the same whichever worker, process or resumed
run builds it. Validation items are every block of every source once, in order, untransformed
(plain -log p(x), the PPL of Tables 1-5) unless ``cm3_on_valid``.

Retrieval augmentation (§3.1, RA-CM3/CM3leon), with ``--retrieval-bank BANK``: the block of an
item whose source has a ``.neighbors.npy`` (checked against the block count and the bank's size
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

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from jam_metaseq.data.binarize import TokenBlockDataset, open_dataset
from jam_metaseq.data.mixture import MixtureStream
from jam_metaseq.hosts import args as jam_args
from jam_metaseq.models import build_model
from jam_metaseq.objectives.cm3 import CM3Config, cm3_transform, item_rng
from jam_metaseq.objectives.loss import per_token_nll, reduce_token_nll, token_weights
from jam_metaseq.vocab import VocabManifest


logger = logging.getLogger(__name__)

TASK_NAME = "cm3_multimodal"
"""The task's name in both hosts' registries (``--task``)."""
CRITERION_NAME = "cm3"
"""The criterion's name in both hosts' registries (``--criterion``)."""


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
    """Memory bank (``jam-retrieval`` output) whose documents are prefixed to items with neighbors."""
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
    if (root / "vocab.json").is_file():
        return VocabManifest.load(root / "vocab.json")
    splits = [train_subset] + sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != train_subset)
    for split in splits:
        if (root / split).is_dir():
            for prefix in find_sources(root, split).values():
                return open_dataset(prefix).vocab
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
        self._neighbors: dict[str, np.ndarray | None] = {}
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
        d["_neighbors"] = {}
        return d

    def _load_bank(self) -> Any:
        if self._bank is None:
            from jam_metaseq.retrieval.bank import MemoryBank

            try:
                self._bank = MemoryBank.load(self.opts.retrieval_bank)
            except (FileNotFoundError, ValueError, KeyError) as e:
                raise DataSetupError(f"cm3_multimodal: --retrieval-bank {self.opts.retrieval_bank}: {e}") from None
        return self._bank

    def _load_neighbors(self, name: str) -> np.ndarray | None:
        if name not in self._neighbors:
            from jam_metaseq.retrieval.retriever import load_block_neighbours

            ds = self.sources[name]
            try:
                self._neighbors[name] = load_block_neighbours(ds.prefix, num_blocks=len(ds),
                                                              bank_size=len(self._load_bank()))
            except ValueError as e:
                raise DataSetupError(f"cm3_multimodal: {e}") from None
        return self._neighbors[name]

    def _check_retrieval(self) -> None:
        """Fail at setup, not mid-epoch: the bank's vocabulary and every neighbours file must fit."""
        bank = self._load_bank()
        bv = bank.vocab
        if bv is not None and bv.to_dict() != self.vocab.to_dict():
            raise DataSetupError(f"cm3_multimodal: --retrieval-bank {bank.path} was built with a vocabulary "
                                 f"of {bv.size} ids, the data's has {self.vocab.size} (or their layouts differ)")
        found = [n for n in self.names if self._load_neighbors(n) is not None]
        logger.info(f"cm3_multimodal: retrieval prefixes from {bank.path} ({len(bank)} documents, k <= "
                    f"{self.opts.retrieval_k}, weight {self.opts.retrieval_weight}) for sources {found}")
        if self.train and not found:
            raise DataSetupError(
                f"cm3_multimodal: --retrieval-bank is set but no training source has a neighbours file "
                f"({', '.join(self.sources[n].prefix + '.neighbors.npy' for n in self.names)}): run "
                f"`jam-retrieval neighbours {self.opts.retrieval_bank} --dataset PREFIX`")

    def _retrieved(self, name: str, block: int) -> list[np.ndarray]:
        """Token arrays of the block's retrieved documents (at most ``retrieval_k``, best first)."""
        if not self.opts.retrieval_bank:
            return []
        nb = self._load_neighbors(name)
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


# ---- flags (argparse only; both hosts use these) ----------------------------------------------
def add_task_args(parser: Any) -> None:
    """The cm3_multimodal task flags."""
    a = parser.add_argument
    a("data", help="data directory: DATA/{split}/{source}.json binarized sources (+ optional vocab.json)")
    a("--tokens-per-sample", type=int, default=2048, help="model input length (default %(default)s)")
    a("--mixture", default=None,
      help="training source weights NAME=W,NAME=W (token-balanced; default: all sources equally)")
    a("--cm3-mode", default="poisson", choices=("poisson", "fixed", "fim"), help="CM3 span-count rule")
    a("--cm3-lambda", type=float, default=1.0, help="Poisson rate of the number of CM3 spans")
    a("--cm3-min-spans", type=int, default=0, help="lower clamp of the span count (0 allows plain LM)")
    a("--cm3-max-spans", type=int, default=None, help="upper clamp (default: the vocabulary's sentinels)")
    a("--cm3-cross-documents", action="store_true", help="let spans cross <eos> inside a packed block")
    a("--cm3-on-valid", action="store_true", help="CM3-transform validation items too")
    a("--instruction", action="store_true",
      help="instruction mode: loss only on tokens the data's loss mask keeps (responses)")
    a("--epoch-items", type=int, default=0, help="training items per epoch (0 = all blocks)")
    a("--retrieval-bank", default=None,
      help="memory bank (jam-retrieval build) whose documents are prefixed to items; a source's blocks "
           "get neighbours from DATA/{split}/{source}.neighbors.npy (jam-retrieval neighbours BANK "
           "--dataset DATA/{split}/{source}); sources without one get no prefix")
    a("--retrieval-k", type=int, default=2, help="retrieved documents per item at most (default %(default)s)")
    a("--retrieval-weight", type=float, default=0.0,
      help="loss weight of retrieved prefix tokens (RA-CM3 used 0.1; default %(default)s)")


def saved_cfg_groups(*, seed: int = 1) -> dict[str, Any]:
    """The ``cfg`` groups besides ``model`` that a host's evaluation CLI (``metaseq-validate`` /
    ``fairseq-validate --path``) rebuilds the task and criterion from, for checkpoints written
    outside a trainer (``jam-ckpt``): ``task`` and ``criterion`` Namespaces holding every
    ``cm3_multimodal`` / ``cm3`` flag at its default (the hosts set DATA and the flags given on the
    command line over them), and an ``optimization`` group like a trainer's (no updates yet)."""
    p = argparse.ArgumentParser(add_help=False)
    add_task_args(p)
    p.add_argument("--sentinel-weight", type=float, default=1.0)  # CM3CriterionMixin.add_args
    flags = vars(p.parse_args([""]))  # DATA: the evaluation CLI's positional argument replaces it
    names = {"task": TASK_NAME, "criterion": CRITERION_NAME, "seed": seed}
    return {
        "task": argparse.Namespace(**names, **flags, _name=TASK_NAME),
        "criterion": argparse.Namespace(**names, **flags, _name=CRITERION_NAME),
        "optimization": {"_name": None, "max_epoch": 0, "max_update": 0, "clip_norm": 0.0,
                         "update_freq": [1], "lr": [0.0]},
    }


def task_options_from_args(args: argparse.Namespace, vocab: VocabManifest) -> TaskOptions:
    """TaskOptions from parsed task flags (+ the host's ``--seed``)."""
    max_spans = args.cm3_max_spans if args.cm3_max_spans is not None else vocab.num_sentinels
    return TaskOptions(
        data=args.data.split(":")[0], tokens_per_sample=args.tokens_per_sample,
        mixture=parse_mixture(args.mixture),
        cm3=CM3Config(mode=args.cm3_mode, lam=args.cm3_lambda, min_spans=min(args.cm3_min_spans, max_spans),
                      max_spans=max_spans, cross_documents=args.cm3_cross_documents),
        cm3_on_valid=args.cm3_on_valid, instruction=args.instruction, seed=args.seed,
        epoch_items=args.epoch_items, retrieval_bank=args.retrieval_bank, retrieval_k=args.retrieval_k,
        retrieval_weight=args.retrieval_weight)


def logging_output(out: Any, sample: dict[str, Any]) -> dict[str, Any]:
    """The criterion's per-batch log (sums; summable across workers)."""
    return {
        "loss": out.loss.data, "nll_loss": out.nll_sum.data, "ntokens": sample["ntokens"],
        "nsentences": sample["nsentences"], "sample_size": out.weight_sum.data,
        "counted_tokens": out.ntokens.data, "text_nll": out.text_nll_sum, "text_tokens": out.text_tokens,
        "image_nll": out.image_nll_sum, "image_tokens": out.image_tokens,
    }


def reduce_cm3_metrics(logging_outputs: list[dict[str, Any]], *, metrics: Any, get_perplexity: Any) -> None:
    """Shared by both hosts (their ``metrics`` modules have the same API)."""
    def total(key: str) -> float:
        return float(sum(float(log.get(key, 0)) for log in logging_outputs))

    ln2 = math.log(2)
    sample_size = total("sample_size")
    metrics.log_scalar("loss", total("loss") / max(sample_size, 1e-8) / ln2, sample_size, round=3)
    counted = total("counted_tokens")
    metrics.log_scalar("nll_loss", total("nll_loss") / max(counted, 1e-8) / ln2, counted, round=3)
    metrics.log_derived("ppl", lambda m: get_perplexity(m["nll_loss"].avg))
    for kind in ("text", "image"):
        n = total(f"{kind}_tokens")
        if n > 0:
            metrics.log_scalar(f"{kind}_loss", total(f"{kind}_nll") / n / ln2, n, round=3)
            metrics.log_derived(f"{kind}_ppl", (lambda k: lambda m: get_perplexity(m[f"{k}_loss"].avg))(kind))


# ---- checkpoints ---------------------------------------------------------------------------
def safe_globals() -> list[Any]:
    """Non-tensor globals fairseq/metaseq checkpoints hold, for ``weights_only`` loading (torch >= 2.6)."""
    out: list[Any] = [argparse.Namespace, np.dtype, np.ndarray]
    for mod_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            mod = __import__(mod_name, fromlist=["scalar"])
        except ImportError:
            continue
        for name in ("scalar", "_reconstruct"):
            if hasattr(mod, name):
                out.append(getattr(mod, name))
    out += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return out


def allow_checkpoint_globals() -> None:
    """Allow-list ``safe_globals()`` process-wide (idempotent), so hosts' own ``torch.load`` works."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add(safe_globals())


def normalise_start_state(state: Any) -> Any:
    """Give a freshly written starting checkpoint (``jam-ckpt``: ``optimizer_history == []``,
    ``extra_state is None``) the neutral entries the hosts' checkpoint upgraders index into."""
    if isinstance(state, dict) and "model" in state:
        if not state.get("optimizer_history"):
            state["optimizer_history"] = [{"criterion_name": "CM3Criterion", "optimizer_name": "none",
                                           "lr_scheduler_state": {}, "num_updates": 0}]
        if state.get("extra_state") is None:
            state["extra_state"] = {}
    return state


def patch_host_upgrader(module: Any) -> None:
    """Wrap ``module._upgrade_state_dict`` (fairseq/metaseq ``checkpoint_utils``) once with
    ``normalise_start_state``."""
    orig = getattr(module, "_upgrade_state_dict", None)
    if orig is None or getattr(orig, "_jam_wrapped", False):
        return

    def upgrade(state: Any) -> Any:
        return orig(normalise_start_state(state))

    upgrade._jam_wrapped = True  # type: ignore[attr-defined]
    module._upgrade_state_dict = upgrade


def patch_host_broadcast(module: Any) -> None:
    """Let ``module._broadcast_object_slow`` (fairseq/metaseq ``distributed.utils``) unpickle on
    torch >= 2.6. It carries objects rank 0 built itself (e.g. a checkpoint it read through the
    allow-listed ``weights_only`` load, plus the host's OmegaConf config) to the other ranks of the
    same job, so the receiving side may load it unrestricted; checkpoint files never go through it."""
    orig = getattr(module, "_broadcast_object_slow", None)
    if orig is None or getattr(orig, "_jam_wrapped", False):
        return
    import io

    def broadcast_object_slow(obj: Any, src_rank: int, group: object, dist_device: torch.device) -> Any:
        if module.get_rank(group) == src_rank:
            return orig(obj, src_rank, group, dist_device)
        length = torch.LongTensor([0]).to(dist_device)
        module.broadcast(length, src=src_rank, group=group)
        buffer = torch.ByteTensor(int(length.item())).to(dist_device)
        module.broadcast(buffer, src=src_rank, group=group)
        return torch.load(io.BytesIO(buffer.cpu().numpy()), map_location="cpu", weights_only=False)

    broadcast_object_slow._jam_wrapped = True  # type: ignore[attr-defined]
    module._broadcast_object_slow = broadcast_object_slow


def patch_host_load_checkpoint(module: Any) -> None:
    """Wrap ``module.load_checkpoint(cfg, trainer, ...)`` (fairseq/metaseq ``checkpoint_utils``,
    which their training CLIs call once, after building the model and before the first update)
    once with ``check_trainer_start``: a starting checkpoint that is missing, unreadable or does
    not fit the JAM model stops every rank with one line before the host loads it."""
    orig = getattr(module, "load_checkpoint", None)
    if orig is None or getattr(orig, "_jam_wrapped", False):
        return

    def load_checkpoint(cfg: Any, trainer: Any, *args: Any, **kwargs: Any) -> Any:
        check_trainer_start(cfg, trainer)
        return orig(cfg, trainer, *args, **kwargs)

    load_checkpoint._jam_wrapped = True  # type: ignore[attr-defined]
    module.load_checkpoint = load_checkpoint


def check_trainer_start(cfg: Any, trainer: Any) -> None:
    """``check_start_checkpoint`` for the file this rank's trainer is about to load (its
    ``-model_part-{r}`` at model-parallel size > 1; FSDP shards, flat, are not checked), then
    agreed on by all ranks, so that no rank waits for one that stopped."""
    from checkpoints_tools import layout
    from jam_metaseq.fusion import state_shapes

    model, task = trainer.get_model(), trainer.task
    vocab = getattr(task, "vocab", None)
    suffix = trainer.checkpoint_suffix or ""
    if not hasattr(model, "jam_config") or not isinstance(vocab, VocabManifest) or "-shard" in suffix:
        return
    mp = getattr(model, "model_parallel_size", 1)
    # this rank's shapes from the config and the split plan, not from the live (maybe wrapped) model
    shapes = {k: layout.part_shape(k, s, mp) for k, s in state_shapes(model.jam_config).items()}
    error: StartCheckpointError | None = None
    path = start_checkpoint(restore_file=getattr(cfg, "restore_file", None),
                            finetune_from_model=getattr(cfg, "finetune_from_model", None),
                            save_dir=getattr(cfg, "save_dir", "checkpoints"), suffix=suffix)
    if path is not None:
        whole = path.replace(f"{suffix}.pt", ".pt") if suffix else path
        try:
            if mp > 1 and not Path(path).exists() and Path(whole).is_file():
                raise StartCheckpointError(
                    f"{path}: not found; {whole} is one consolidated file and --model-parallel-size {mp} "
                    f"loads one -model_part-{{r}} file per rank: write them with jam-ckpt reshard {whole} "
                    f"--mp {mp} -o DIR")
            check_start_checkpoint(path, model_shapes=shapes, vocab=vocab, model_parallel_size=mp)
        except StartCheckpointError as e:
            error = e
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        failed = torch.tensor([0.0 if error is None else 1.0], device=getattr(trainer, "device", "cpu"))
        dist.all_reduce(failed)
        if error is None and failed.item() > 0:
            error = StartCheckpointError(f"{int(failed.item())} other rank(s) cannot use their starting checkpoint "
                                         f"(their error is above)")
    if error is not None:
        raise error


class StartCheckpointError(ValueError):
    """A starting checkpoint the run cannot use; raised while the model is built, before training.
    The host CLIs print it as one line (``install_one_line_errors``)."""


def _unsafe_hint(msg: str, path: str | Path) -> str:
    """jam-ckpt's message for a refused global, with the way out a host run has (no --trust-pickle)."""
    head = msg.split("; pass --trust-pickle", 1)[0]
    return (f"{head}; if you trust this file, rewrite it without them: "
            f"jam-ckpt convert {path} --to metaseq -o DIR --trust-pickle")


def peek_checkpoint(path: str | Path) -> dict[str, Any]:
    """Shapes and stored JAM config of a checkpoint without reading its tensors, through the
    checkpoint tools' loader (``checkpoints_tools.safe_load``: allow-listed globals only,
    memory-mapped, legacy non-zip files too); its errors become ``StartCheckpointError`` with
    jam-ckpt's one-line message."""
    from checkpoints_tools.safe_load import CheckpointError, UnsafePickleError, safe_torch_load

    allow_checkpoint_globals()
    p = Path(path)
    if p.is_dir():
        found = sorted(q.name for q in p.glob("*.pt"))
        raise StartCheckpointError(f"starting checkpoint {p} is a directory (jam-ckpt output?): pass one of its "
                                   f"files, {p}/{found[0] if found else 'checkpoint.pt'}")
    if not p.is_file():
        raise StartCheckpointError(f"starting checkpoint not found: {p}")
    try:
        state = safe_torch_load(p, mmap=True)
    except UnsafePickleError as e:
        raise StartCheckpointError(_unsafe_hint(str(e).splitlines()[0], p)) from None
    except CheckpointError as e:
        raise StartCheckpointError(str(e).splitlines()[0]) from None
    model = state.get("model") if isinstance(state, dict) else None
    if not isinstance(model, dict):
        raise StartCheckpointError(f"{path}: not a metaseq/fairseq checkpoint (no 'model' state dict)")
    cfg = state.get("jam_config")
    if cfg is None:
        margs = (state.get("cfg") or {}).get("model") if isinstance(state.get("cfg"), dict) else None
        cfg = getattr(margs, "jam_config", None) if margs is not None else None
    return {"shapes": {k: tuple(v.shape) for k, v in model.items() if torch.is_tensor(v)},
            "jam_config": cfg}


def check_start_checkpoint(path: str | Path, *, model_shapes: Mapping[str, tuple[int, ...]],
                           vocab: VocabManifest, model_parallel_size: int = 1) -> None:
    """Stop before training when the starting weights cannot fit this model and vocabulary
    (``model_shapes``: this process's model, one rank's part at model-parallel size > 1)."""
    info = peek_checkpoint(path)
    shapes = info["shapes"]
    emb = shapes.get("decoder.embed_tokens.weight")
    if emb is None:
        raise StartCheckpointError(f"{path}: no decoder.embed_tokens.weight; not a JAM/metaseq checkpoint")
    rows = emb[0] if emb[0] == vocab.size else emb[0] * model_parallel_size  # a part: V / N rows
    try:
        vocab.check_embedding(rows, what=f"checkpoint {path}")
    except ValueError as e:
        raise StartCheckpointError(str(e)) from None
    missing = sorted(set(model_shapes) - set(shapes))
    extra = sorted(set(shapes) - set(model_shapes))
    if missing or extra:
        raise StartCheckpointError(
            f"{path}: keys do not match the --arch model: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for k, s in model_shapes.items():
        if tuple(s) != shapes[k]:
            hint = ""
            if model_parallel_size > 1 and emb[0] == vocab.size:
                hint = (f" (one consolidated file at --model-parallel-size {model_parallel_size}: write its "
                        f"parts with jam-ckpt reshard {path} --mp {model_parallel_size} -o DIR)")
            raise StartCheckpointError(f"{path}: {k} has shape {shapes[k]} but the --arch model expects "
                                       f"{tuple(s)}{hint}")


def start_checkpoint(*, restore_file: str | None, finetune_from_model: str | None,
                     save_dir: str, suffix: str = "") -> str | None:
    """The file a host will load the starting weights from (None: fresh or resuming its own run),
    resolved as fairseq/metaseq ``checkpoint_utils.load_checkpoint`` do for this rank's ``suffix``
    (``-model_part-{r}``: the host inserts it before every ``.pt`` of the path)."""
    last = Path(save_dir) / f"checkpoint_last{suffix}.pt"
    if finetune_from_model:
        if last.exists():
            return None
        if Path(finetune_from_model).exists() or not suffix:
            return finetune_from_model
        return finetune_from_model.replace(".pt", suffix + ".pt")
    if restore_file and restore_file != "checkpoint_last.pt":
        if int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0) > 0 and last.is_file():
            return None  # a requeued job: metaseq resumes from its own checkpoint_last
        return restore_file.replace(".pt", suffix + ".pt") if suffix else restore_file
    return None


_ONE_LINE_ERRORS: tuple[type[BaseException], ...] = (DataSetupError, StartCheckpointError)


def install_one_line_errors() -> None:
    """Print a ``DataSetupError`` / ``StartCheckpointError`` that ends a host CLI as one line,
    ``PROG: error: MESSAGE`` (as jam-ckpt does), not a traceback; other exceptions are untouched.
    Idempotent; the process still exits with status 1."""
    prev = sys.excepthook
    if getattr(prev, "_jam_one_line", False):
        return

    def hook(etype: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(etype, _ONE_LINE_ERRORS):
            msg = str(value).splitlines()[0] if str(value) else etype.__name__
            print(f"{Path(sys.argv[0]).name or 'python'}: error: {msg}", file=sys.stderr, flush=True)
            return
        prev(etype, value, tb)

    hook._jam_one_line = True  # type: ignore[attr-defined]
    sys.excepthook = hook


# ---- what both hosts' classes share (mixins; each host adds its base class and API) -------------
# A host class lists the mixin first, ``class X(CM3DatasetMixin, FairseqDataset)``, so the mixin's
# methods win over the base's placeholders and its ``super().__init__`` reaches the host base.
def build_core(args: argparse.Namespace, task: Any) -> tuple[Any, torch.nn.Module]:
    """The config (``args.jam_config`` if stored, else the flags) and the core model of a host's
    ``build_model``; records the config in ``args`` (pickled into every checkpoint with it)."""
    vocab: VocabManifest = task.vocab
    dictionary = task.target_dictionary
    cfg = jam_args.config_from_args(args, vocab_size=len(dictionary), padding_idx=dictionary.pad(),
                                    image_range=(vocab.image_start, vocab.image_end))
    vocab.check_embedding(cfg.vocab_size, what="model")
    args.jam_config = cfg.to_dict()
    return cfg, build_model(cfg)


class JamModelMixin:
    """A host model whose ``decoder`` is a ``CoreDecoderMixin`` decoder."""

    @staticmethod
    def add_args(parser: Any) -> None:
        jam_args.add_model_args(parser)

    def max_positions(self) -> int:
        return self.decoder.max_positions()  # type: ignore[attr-defined]


class CoreDecoderMixin:
    """A host decoder around a core JAM model; its children are the core's ``decoder.*`` modules,
    so ``state_dict()`` keys are metaseq's (``decoder.embed_tokens.weight`` ...)."""

    def __init__(self, dictionary: Any, core: torch.nn.Module) -> None:
        super().__init__(dictionary)  # type: ignore[call-arg]
        for name, child in core.decoder.named_children():
            self.add_module(name, child)  # type: ignore[attr-defined]
        for name, buf in core.decoder.named_buffers(recurse=False):
            self.register_buffer(name, buf)  # type: ignore[attr-defined]
        self.__dict__["core"] = core  # not a submodule: its parameters are ours already

    def train(self, mode: bool = True) -> Any:
        super().train(mode)  # type: ignore[misc]
        self.core.train(mode)  # the core's own containers carry the dropout flags it reads
        return self

    def core_forward(self, prev_output_tokens: torch.Tensor, *, incremental_state: Any,
                     features_only: bool) -> tuple[torch.Tensor, dict]:
        """The hosts' ``forward`` minus their differing signatures."""
        if incremental_state is not None:
            raise NotImplementedError("incremental decoding of JAM models: use jam-generate (KV cache)")
        x = self.core.extract_features(prev_output_tokens)  # (B, T, E)
        if features_only:
            return x, {}
        return self.core.output_layer(x), {}  # (B, T, V), or (B, T, V/N) vocab-parallel

    def extract_features(self, prev_output_tokens: torch.Tensor, **unused: Any):
        return self.core.extract_features(prev_output_tokens), {}

    def output_layer(self, features: torch.Tensor, **unused: Any) -> torch.Tensor:
        return self.core.output_layer(features)

    def max_positions(self) -> int:
        return self.core.cfg.max_positions


class CM3DatasetMixin:
    """``CM3Items`` as a host dataset (constant item size bound, so batches are planned once and an
    epoch only changes which block each item reads)."""

    def __init__(self, items: CM3Items, *, pad: int) -> None:
        super().__init__()
        self.items = items
        self.pad = pad
        self.sizes = np.full(len(items), items.opts.tokens_per_sample, dtype=np.int64)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]

    def __len__(self) -> int:
        return len(self.items)

    def collater(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples, pad=self.pad)

    def num_tokens(self, index: int) -> int:
        return int(self.sizes[index])

    def size(self, index: int) -> int:
        return int(self.sizes[index])

    def ordered_indices(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64)  # items are shuffled by the mixture plan

    def set_epoch(self, epoch: int) -> None:
        self.items.set_epoch(epoch)


class CM3TaskMixin:
    """The ``cm3_multimodal`` task; a host class sets ``dataset_class`` and ``make_dictionary``
    (``staticmethod(VocabManifest -> host Dictionary)``). Logs go to the host module's logger."""

    dataset_class: type
    make_dictionary: Any

    @staticmethod
    def add_args(parser: Any) -> None:
        add_task_args(parser)

    def __init__(self, args: argparse.Namespace, vocab: VocabManifest, dictionary: Any) -> None:
        super().__init__(args)  # type: ignore[call-arg]
        self.args = args
        self.vocab = vocab
        self.dictionary = dictionary
        self.opts = task_options_from_args(args, vocab)
        self.state.merge_state_dict({"vocab_manifest": vocab.to_dict()})  # type: ignore[attr-defined]

    @classmethod
    def setup_task(cls, args: argparse.Namespace, **kwargs: Any) -> Any:
        data = args.data.split(":")[0]
        vocab = load_manifest(data, train_subset=getattr(args, "train_subset", "train"))
        dictionary = cls.make_dictionary(vocab)
        logging.getLogger(cls.__module__).info(
            f"cm3_multimodal: {data}: vocabulary of {vocab.size} ids "
            f"(text {vocab.text_size}, image codes {vocab.image_codes})")
        return cls(args, vocab, dictionary)

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs: Any) -> None:
        prefixes = find_sources(self.opts.data, split)
        sources = {n: open_dataset(p, vocab=self.vocab) for n, p in prefixes.items()}
        train = split == getattr(self.args, "train_subset", "train")
        items = CM3Items(sources, vocab=self.vocab, opts=self.opts, train=train, epoch=epoch)
        logging.getLogger(type(self).__module__).info(
            f"cm3_multimodal: {split}: {len(items)} items from sources {list(sources)}")
        self.datasets[split] = self.dataset_class(items, pad=self.dictionary.pad())  # type: ignore[attr-defined]

    def on_model_built(self, model: Any, args: argparse.Namespace) -> None:
        """Record the config in the task state (the starting weights are checked when a trainer
        loads them: ``patch_host_load_checkpoint``)."""
        self.state.merge_state_dict({"jam_config": model.jam_config.to_dict()})  # type: ignore[attr-defined]

    def max_positions(self) -> int:
        return self.opts.tokens_per_sample

    @property
    def source_dictionary(self) -> Any:
        return self.dictionary

    @property
    def target_dictionary(self) -> Any:
        return self.dictionary


class CM3CriterionMixin:
    """Token cross-entropy with data loss weights and optional sentinel weight; logs text and image
    loss/PPL separately (base 2, as the hosts log ``loss``/``ppl``). A host may override
    ``token_nll`` (metaseq: vocab-parallel cross-entropy) and supplies ``reduce_metrics``."""

    def __init__(self, task: Any, sentinel_weight: float = 1.0) -> None:
        super().__init__(task)  # type: ignore[call-arg]
        self.vocab: VocabManifest = task.vocab
        self.sentinel_weight = float(sentinel_weight)

    @staticmethod
    def add_args(parser: Any) -> None:
        parser.add_argument("--sentinel-weight", type=float, default=1.0,
                            help="loss weight of predicting CM3 sentinels (CM3 used 0; default %(default)s)")

    def token_nll(self, model: Any, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """-log p(target) per token (B, T) from the model's logits (B, T, V)."""
        return per_token_nll(logits, target)

    def forward(self, model: Any, sample: dict[str, Any], reduce: bool = True):
        logits, _ = model(**sample["net_input"])
        target = sample["target"]
        # = objectives.loss.cm3_loss, with the nll step replaceable
        weights = token_weights(target, vocab=self.vocab, loss_mask=sample.get("loss_weights"),
                                sentinel_weight=self.sentinel_weight, padding_idx=self.padding_idx)
        out = reduce_token_nll(self.token_nll(model, logits, target), target, vocab=self.vocab, weights=weights)
        return out.loss, out.weight_sum.data, logging_output(out, sample)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def arch_defaults(family: str, size: str) -> Any:
    """A host's arch function: fills unset flags of ``family`` at ``size`` (``hosts.args``)."""
    def fill(args: argparse.Namespace) -> None:
        jam_args.apply_arch_defaults(args, family=family, size=size)

    fill.__name__ = f"arch_{family}_{size}"
    return fill


def register_with_host(*, model_class: type, model_registry: Mapping[str, Any], register_model: Any,
                       arch_registry: Mapping[str, Any], register_model_architecture: Any,
                       task: tuple[type, Mapping[str, Any], Any], criterion: tuple[type, Mapping[str, Any], Any],
                       checkpoint_utils: Any, distributed_utils: Any = None) -> None:
    """Make a host load and broadcast JAM checkpoints (``allow_checkpoint_globals``, its
    ``checkpoint_utils`` and ``distributed.utils`` patched; None: not patched), then register a
    ``model_class`` subclass per JAM family, every arch, the task (``TASK_NAME``) and the criterion
    (``CRITERION_NAME``) with its registry API (``task`` / ``criterion`` = (class, host registry, host
    register function)), skipping names it already holds (its registries refuse duplicates)."""
    allow_checkpoint_globals()
    install_one_line_errors()
    patch_host_upgrader(checkpoint_utils)
    patch_host_load_checkpoint(checkpoint_utils)
    if distributed_utils is not None:
        patch_host_broadcast(distributed_utils)
    for family in jam_args.FAMILIES:
        if family not in model_registry:
            sub = type(f"{model_class.__name__}_{family}", (model_class,), {"__module__": model_class.__module__})
            register_model(family)(sub)
    for arch, (family, size) in jam_args.arch_names().items():
        if arch not in arch_registry:
            register_model_architecture(family, arch)(arch_defaults(family, size))
    for name, (cls, registry, register) in ((TASK_NAME, task), (CRITERION_NAME, criterion)):
        if name not in registry:
            register(name)(cls)

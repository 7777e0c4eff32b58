"""What the fairseq and metaseq adapters share: mixins for their model, decoder, dataset, task
and criterion classes, the criterion's logs, and ``register_with_host``. Each host file adds its
base classes, signatures and registry calls; nothing here imports a host.

Mixins go first in a host class, ``class X(CM3DatasetMixin, FairseqDataset)``, so their methods win
over the base's placeholders and their ``super().__init__`` reaches the host base. The items, the
batches and the task options are ``jam_metaseq.task.items``; flags are ``jam_metaseq.flags`` (the
arch functions' glue: ``hosts.args``); what makes the hosts load our checkpoints is ``hosts.compat``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
from typing import Any

import numpy as np
import torch

from jam_metaseq import flags
from jam_metaseq.data.binarize import open_dataset
from jam_metaseq.task.items import CM3Items, collate, find_sources, load_manifest
from jam_metaseq.hosts import args as jam_args
from jam_metaseq.hosts import compat
from jam_metaseq.models import build_model
from jam_metaseq.objectives.loss import per_token_nll, reduce_token_nll, token_weights
from jam_metaseq.models.config import CHECKPOINT_KEY as CONFIG_KEY
from jam_metaseq.vocab import VocabManifest


def host_dictionary(dictionary_class: type, vocab: VocabManifest) -> Any:
    """A host ``Dictionary`` whose ids are the manifest's: its specials 0-3, then every symbol; an
    imported parent's manifest (explicit ids) puts its specials where its tokenizer has them."""
    d = dictionary_class()
    if vocab.explicit_ids is None:
        for sym in vocab.symbols()[4:]:
            d.add_symbol(sym, n=1)
    else:  # fairseq/metaseq Dictionaries number their specials 0-3 when built; set them instead
        syms = vocab.symbols()
        d.symbols, d.count = list(syms), [1] * len(syms)
        d.indices = {sym: i for i, sym in reversed(list(enumerate(syms)))}
        d.bos_index, d.pad_index, d.eos_index, d.unk_index = vocab.bos, vocab.pad, vocab.eos, vocab.unk
    if len(d) != vocab.size or d.pad() != vocab.pad or d.eos() != vocab.eos or d.bos() != vocab.bos:
        raise ValueError(f"{dictionary_class.__module__} Dictionary has {len(d)} symbols, the manifest {vocab.size}")
    return d


def build_core(args: argparse.Namespace, task: Any, *, meta: bool = False) -> tuple[Any, torch.nn.Module]:
    """The config (``args.jam_config`` if stored, else the flags) and the core model of a host's
    ``build_model``; records the config in ``args`` (pickled into every checkpoint with it).
    ``meta``: the model on the meta device (no memory, no random draws; values come later, e.g.
    ``jam_metaseq.models.fresh_parameters``)."""
    vocab: VocabManifest = task.vocab
    dictionary = task.target_dictionary
    cfg = flags.config_from_args(args, vocab_size=len(dictionary), padding_idx=dictionary.pad(),
                                    image_range=(vocab.image_start, vocab.image_end))
    vocab.check_embedding(cfg.vocab_size, what="model")
    args.jam_config = cfg.to_dict()
    if meta:
        with torch.device("meta"):
            return cfg, build_model(cfg)
    return cfg, build_model(cfg)


class JamModelMixin:
    """A host model whose ``decoder`` is a ``CoreDecoderMixin`` decoder."""

    @staticmethod
    def add_args(parser: Any) -> None:
        flags.add_model_args(parser)

    def load_state_dict(self, state_dict: Any, strict: bool = True, **kwargs: Any) -> Any:
        """The host's own load, after refusing FSDP flat parameters with one line: a model that is
        not fully sharded (``metaseq-validate``, a single-process run) given a fully-sharded run's
        shard would otherwise fail on every key. (A fully-sharded run loads its shards through
        fairscale, which does not call this.)"""
        flat = next((k for k in state_dict if k.rsplit(".", 1)[-1].startswith("flat_param_")), None)
        if flat is not None:
            raise compat.StartCheckpointError(
                f"the checkpoint holds FSDP flat parameters ({flat}) of a fully-sharded run, which load only into a "
                "fully-sharded run (--ddp-backend fully_sharded --use-sharded-state) of its size: consolidate them "
                "first with jam-ckpt convert SHARD_FILE --to metaseq -o DIR")
        return super().load_state_dict(state_dict, strict=strict, **kwargs)  # type: ignore[misc]

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
        flags.add_task_args(parser)

    def __init__(self, args: argparse.Namespace, vocab: VocabManifest, dictionary: Any) -> None:
        super().__init__(args)  # type: ignore[call-arg]
        self.args = args
        self.vocab = vocab
        self.dictionary = dictionary
        self.opts = jam_args.task_options_from_args(args, vocab)
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
        loads them: ``compat.patch_host_load_checkpoint``)."""
        self.state.merge_state_dict({CONFIG_KEY: model.jam_config.to_dict()})  # type: ignore[attr-defined]

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
        flags.add_criterion_args(parser)

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


_REGISTERED: set[str] = set()


def register_with_host(host: str, *, model_class: type, task_class: type, criterion_class: type) -> None:
    """Register with ``host`` (``fairseq`` / ``metaseq``: the same registry API) once per process:
    first make it load and broadcast JAM checkpoints (``hosts.compat``: the allow-list, its
    ``checkpoint_utils`` and, where it has one, ``distributed.utils`` patched, one-line errors),
    then a ``model_class`` subclass per JAM family, every arch, the task ``task_class`` as
    ``args.TASK_NAME`` and the criterion ``criterion_class`` as ``args.CRITERION_NAME``, skipping
    names its registries already hold (they refuse duplicates)."""
    if host in _REGISTERED:
        return
    models, tasks, criterions, checkpoint_utils = (importlib.import_module(f"{host}.{m}") for m in (
        "models", "tasks", "criterions", "checkpoint_utils"))
    compat.allow_checkpoint_globals()
    compat.install_one_line_errors()
    compat.patch_host_upgrader(checkpoint_utils)
    compat.patch_host_load_checkpoint(checkpoint_utils)
    compat.patch_host_unsharded_load(checkpoint_utils)
    try:
        compat.patch_host_broadcast(importlib.import_module(f"{host}.distributed.utils"))
    except ImportError:
        pass
    for family in flags.FAMILIES:
        if family not in models.MODEL_REGISTRY:
            sub = type(f"{model_class.__name__}_{family}", (model_class,), {"__module__": model_class.__module__})
            models.register_model(family)(sub)
    for arch, (family, size) in jam_args.arch_names().items():
        if arch not in models.ARCH_MODEL_REGISTRY:
            models.register_model_architecture(family, arch)(arch_defaults(family, size))
    if flags.TASK_NAME not in tasks.TASK_REGISTRY:
        tasks.register_task(flags.TASK_NAME)(task_class)
    if flags.CRITERION_NAME not in criterions.CRITERION_REGISTRY:
        criterions.register_criterion(flags.CRITERION_NAME)(criterion_class)
    _REGISTERED.add(host)


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

"""fairseq host adapter: the ``jam_*`` models, the ``cm3_multimodal`` task and the ``cm3`` criterion
(JAM §2.1, §3.1), so that

    fairseq-train DATA --user-dir .../jam_metaseq --task cm3_multimodal --criterion cm3 \
        --arch jam_cross_tiny --restore-file FUSED.pt --reset-optimizer --reset-dataloader ...

trains a JAM model from ``jam-ckpt`` output. Thin by design: flags -> ``hosts.args`` -> config
dataclass -> ``jam_metaseq.models.build_model``; the data and loss math live in ``hosts.common``
and ``objectives.loss``. ``register()`` is idempotent; ``jam_metaseq/__init__`` calls it.

Checkpoints: the model's args (``cfg["model"]``, a Namespace fairseq pickles into every checkpoint)
carry ``jam_config`` = ``cfg.to_dict()``, and the task state (``task_state``) carries ``jam_config``
and ``vocab_manifest``; ``fairseq-validate`` and ``checkpoints_tools.load_model`` rebuild from them.
"""

from __future__ import annotations

import logging
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.data import Dictionary, FairseqDataset
from fairseq.models import (
    ARCH_MODEL_REGISTRY, MODEL_REGISTRY, FairseqIncrementalDecoder, FairseqLanguageModel,
    register_model, register_model_architecture,
)
from fairseq.tasks import TASK_REGISTRY, LegacyFairseqTask, register_task
from fairseq.criterions import CRITERION_REGISTRY

from jam_metaseq.hosts import args as jam_args
from jam_metaseq.hosts.common import (
    CM3Items, add_task_args, allow_checkpoint_globals, check_start_checkpoint, collate,
    find_sources, load_manifest, patch_host_broadcast, patch_host_upgrader, reduce_cm3_metrics,
    start_checkpoint, task_options_from_args,
)
from jam_metaseq.hosts.common import logging_output as logging_output_of
from jam_metaseq.models import build_model
from jam_metaseq.objectives.loss import cm3_loss
from jam_metaseq.vocab import VocabManifest

logger = logging.getLogger(__name__)

TASK_NAME = "cm3_multimodal"
CRITERION_NAME = "cm3"


def dictionary_from_manifest(vocab: VocabManifest) -> Dictionary:
    """A fairseq Dictionary whose ids are the manifest's (specials 0-3, then every symbol)."""
    d = Dictionary()
    for sym in vocab.symbols()[4:]:
        d.add_symbol(sym, n=1)
    if len(d) != vocab.size or d.pad() != vocab.pad or d.eos() != vocab.eos or d.bos() != vocab.bos:
        raise ValueError(f"fairseq Dictionary has {len(d)} symbols, the manifest {vocab.size}")
    return d


# ---- model ---------------------------------------------------------------------------------
class JamDecoder(FairseqIncrementalDecoder):
    """fairseq decoder around a core JAM model; its children are the core's ``decoder.*`` modules,
    so ``state_dict()`` keys are metaseq's (``decoder.embed_tokens.weight`` ...)."""

    def __init__(self, dictionary: Dictionary, core: torch.nn.Module) -> None:
        super().__init__(dictionary)
        for name, child in core.decoder.named_children():
            self.add_module(name, child)
        for name, buf in core.decoder.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        self.__dict__["core"] = core  # not a submodule: its parameters are ours already

    def train(self, mode: bool = True) -> "JamDecoder":
        super().train(mode)
        self.core.train(mode)  # the core's own containers carry the dropout flags it reads
        return self

    def forward(self, prev_output_tokens: torch.Tensor, encoder_out: Any = None,
                incremental_state: Any = None, features_only: bool = False, **unused: Any):
        if incremental_state is not None:
            raise NotImplementedError("incremental decoding of JAM models: use jam-generate (KV cache)")
        x = self.core.extract_features(prev_output_tokens)  # (B, T, E)
        if features_only:
            return x, {}
        return self.core.output_layer(x), {}  # (B, T, V)

    def extract_features(self, prev_output_tokens: torch.Tensor, **unused: Any):
        return self.core.extract_features(prev_output_tokens), {}

    def output_layer(self, features: torch.Tensor, **unused: Any) -> torch.Tensor:
        return self.core.output_layer(features)

    def max_positions(self) -> int:
        return self.core.cfg.max_positions

    def reorder_incremental_state(self, incremental_state: Any, new_order: torch.Tensor) -> None:
        raise NotImplementedError("incremental decoding of JAM models: use jam-generate (KV cache)")


class JamLanguageModel(FairseqLanguageModel):
    """A JAM model (uniform / width / cross) as a fairseq language model."""

    def __init__(self, decoder: JamDecoder, jam_config: Any) -> None:
        super().__init__(decoder)
        self.jam_config = jam_config

    @staticmethod
    def add_args(parser: Any) -> None:
        jam_args.add_model_args(parser)

    @classmethod
    def build_model(cls, args: Namespace, task: Any) -> "JamLanguageModel":
        vocab: VocabManifest = task.vocab
        dictionary = task.target_dictionary
        cfg = jam_args.config_from_args(args, vocab_size=len(dictionary), padding_idx=dictionary.pad(),
                                        image_range=(vocab.image_start, vocab.image_end))
        vocab.check_embedding(cfg.vocab_size, what="model")
        args.jam_config = cfg.to_dict()  # pickled into every checkpoint with cfg["model"]
        core = build_model(cfg)
        model = cls(JamDecoder(dictionary, core), cfg)
        if hasattr(task, "on_model_built"):
            task.on_model_built(model, args)
        return model

    def max_positions(self) -> int:
        return self.decoder.max_positions()


_FAMILY_CLASSES: dict[str, type] = {}


def _family_class(family: str) -> type:
    if family not in _FAMILY_CLASSES:
        _FAMILY_CLASSES[family] = type(f"JamLanguageModel_{family}", (JamLanguageModel,), {})
    return _FAMILY_CLASSES[family]


def _arch_fn(family: str, size: str):
    def fill(args: Namespace) -> None:
        jam_args.apply_arch_defaults(args, family=family, size=size)

    fill.__name__ = f"arch_{family}_{size}"
    return fill


# ---- data ----------------------------------------------------------------------------------
class CM3FairseqDataset(FairseqDataset):
    """``hosts.common.CM3Items`` as a FairseqDataset (constant item size bound, so batches are
    planned once and an epoch only changes which block each item reads)."""

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

    @property
    def can_reuse_epoch_itr_across_epochs(self) -> bool:
        return True  # same sizes every epoch: the batch plan can be reused


class CM3MultimodalTask(LegacyFairseqTask):
    """Mixed text + image-caption (+ interleaved) CM3 training; see ``hosts.common``."""

    @staticmethod
    def add_args(parser: Any) -> None:
        add_task_args(parser)

    def __init__(self, args: Namespace, vocab: VocabManifest, dictionary: Dictionary) -> None:
        super().__init__(args)
        self.vocab = vocab
        self.dictionary = dictionary
        self.opts = task_options_from_args(args, vocab)
        self.state.merge_state_dict({"vocab_manifest": vocab.to_dict()})

    @classmethod
    def setup_task(cls, args: Namespace, **kwargs: Any) -> "CM3MultimodalTask":
        data = args.data.split(":")[0]
        vocab = load_manifest(data, train_subset=getattr(args, "train_subset", "train"))
        dictionary = dictionary_from_manifest(vocab)
        logger.info(f"cm3_multimodal: {data}: vocabulary of {vocab.size} ids "
                    f"(text {vocab.text_size}, image codes {vocab.image_codes})")
        return cls(args, vocab, dictionary)

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs: Any) -> None:
        prefixes = find_sources(self.opts.data, split)
        sources = {n: self._open(p) for n, p in prefixes.items()}
        train = split == getattr(self.args, "train_subset", "train")
        items = CM3Items(sources, vocab=self.vocab, opts=self.opts, train=train, epoch=epoch)
        logger.info(f"cm3_multimodal: {split}: {len(items)} items from sources {list(sources)}")
        self.datasets[split] = CM3FairseqDataset(items, pad=self.dictionary.pad())

    def _open(self, prefix: str):
        from jam_metaseq.data.binarize import open_dataset

        return open_dataset(prefix, vocab=self.vocab)

    def on_model_built(self, model: JamLanguageModel, args: Namespace) -> None:
        """Record the config in the task state and check the starting weights before training."""
        self.state.merge_state_dict({"jam_config": model.jam_config.to_dict()})
        path = start_checkpoint(restore_file=getattr(args, "restore_file", None),
                                finetune_from_model=getattr(args, "finetune_from_model", None),
                                save_dir=getattr(args, "save_dir", "checkpoints"))
        if path is not None and Path(path).exists():
            check_start_checkpoint(path, model_shapes={k: tuple(v.shape) for k, v in model.state_dict().items()},
                                   vocab=self.vocab)

    def max_positions(self) -> int:
        return self.opts.tokens_per_sample

    @property
    def source_dictionary(self) -> Dictionary:
        return self.dictionary

    @property
    def target_dictionary(self) -> Dictionary:
        return self.dictionary


# ---- criterion -----------------------------------------------------------------------------
class CM3Criterion(FairseqCriterion):
    """Token cross-entropy with data loss weights and optional sentinel weight; logs text and
    image loss/PPL separately (base 2, as fairseq logs ``loss``/``ppl``)."""

    def __init__(self, task: Any, sentinel_weight: float = 1.0) -> None:
        super().__init__(task)
        self.vocab: VocabManifest = task.vocab
        self.sentinel_weight = float(sentinel_weight)

    @staticmethod
    def add_args(parser: Any) -> None:
        parser.add_argument("--sentinel-weight", type=float, default=1.0,
                            help="loss weight of predicting CM3 sentinels (CM3 used 0; default %(default)s)")

    def forward(self, model: Any, sample: dict[str, Any], reduce: bool = True):
        logits, _ = model(**sample["net_input"])
        out = cm3_loss(logits, sample["target"], vocab=self.vocab, loss_mask=sample.get("loss_weights"),
                       sentinel_weight=self.sentinel_weight, padding_idx=self.padding_idx)
        logging_output = logging_output_of(out, sample)
        return out.loss, out.weight_sum.data, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs: list[dict[str, Any]]) -> None:
        reduce_cm3_metrics(logging_outputs, metrics=metrics, get_perplexity=utils.get_perplexity)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


# ---- registration --------------------------------------------------------------------------
_registered = False


def register() -> None:
    """Register models, archs, task and criterion with fairseq (idempotent)."""
    global _registered
    if _registered:
        return
    allow_checkpoint_globals()
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils

    patch_host_upgrader(checkpoint_utils)
    patch_host_broadcast(distributed_utils)
    for family in jam_args.FAMILIES:
        if family not in MODEL_REGISTRY:
            register_model(family)(_family_class(family))
    for arch, (family, size) in jam_args.arch_names().items():
        if arch not in ARCH_MODEL_REGISTRY:
            register_model_architecture(family, arch)(_arch_fn(family, size))
    if TASK_NAME not in TASK_REGISTRY:
        register_task(TASK_NAME)(CM3MultimodalTask)
    if CRITERION_NAME not in CRITERION_REGISTRY:
        register_criterion(CRITERION_NAME)(CM3Criterion)
    _registered = True

"""metaseq host adapter: the ``jam_*`` models, the ``cm3_multimodal`` task and the ``cm3`` criterion
for ``metaseq-train`` (JAM §3.1: "All our training procedures are implemented using Metaseq").

Written against metaseq main's plugin API (``metaseq.models.register_model`` /
``register_model_architecture``, ``metaseq.tasks.register_task`` with ``LegacyTask``,
``metaseq.criterions.register_criterion`` with ``BaseCriterion``, ``metaseq.logging.metrics``) and
imported lazily: nothing here runs unless metaseq is installed and imported. metaseq cannot be
installed in this project's CI (``reference/metaseq.md``): this module is checked on a real install
(tests marked ``metaseq``).

- The archs set metaseq's required ``--decoder-learned-pos --share-decoder-input-output-embed``
  (``hosts.args.apply_arch_defaults``); sharded state is the launcher's ``--use-sharded-state``.
- ``--model-parallel-size N > 1``: ``parallelize_tensor(core, ...)`` swaps the core model's
  projections for megatron column/row-parallel linears and its embedding for a vocab-parallel one,
  from outside the model (the core stays plain PyTorch); rank r then holds exactly metaseq's
  ``-model_part-r`` tensors ([K_r; V_r; Q_r] rows of ``qkv_proj``), and the criterion uses
  ``vocab_parallel_cross_entropy`` on the vocab-sharded logits.
- Checkpoints load under torch >= 2.6 through the same allow-list as fairseq (``hosts.common``).
Data, items and the loss math are shared with the fairseq adapter (``hosts.common``,
``objectives.loss``).
"""

from __future__ import annotations

import logging
from argparse import Namespace
from typing import Any

import numpy as np
import torch
from torch import nn

from metaseq.criterions import CRITERION_REGISTRY, BaseCriterion, register_criterion
from metaseq.data import BaseDataset, Dictionary
from metaseq.models import (
    ARCH_MODEL_REGISTRY, MODEL_REGISTRY, BaseDecoder, BaseModel, register_model, register_model_architecture,
)
from metaseq.tasks import TASK_REGISTRY, register_task

try:  # metaseq main
    from metaseq.tasks.base_task import LegacyTask as _TaskBase
except ImportError:  # older trees: BaseTask takes the args namespace as cfg
    from metaseq.tasks.base_task import BaseTask as _TaskBase
try:
    from metaseq.logging import metrics
except ImportError:
    from metaseq import metrics  # type: ignore[no-redef]

from jam_metaseq.hosts import args as jam_args
from jam_metaseq.hosts.common import (
    CM3Items, add_task_args, allow_checkpoint_globals, check_start_checkpoint, collate,
    find_sources, load_manifest, patch_host_broadcast, patch_host_upgrader, reduce_cm3_metrics,
    start_checkpoint, task_options_from_args,
)
from jam_metaseq.hosts.common import logging_output as logging_output_of
from jam_metaseq.models import build_model
from jam_metaseq.objectives.loss import per_token_nll, reduce_token_nll, token_weights
from jam_metaseq.vocab import VocabManifest

logger = logging.getLogger(__name__)

TASK_NAME = "cm3_multimodal"
CRITERION_NAME = "cm3"


def dictionary_from_manifest(vocab: VocabManifest) -> Dictionary:
    d = Dictionary()
    for sym in vocab.symbols()[4:]:
        d.add_symbol(sym, n=1)
    if len(d) != vocab.size:
        raise ValueError(f"metaseq Dictionary has {len(d)} symbols, the manifest {vocab.size}")
    return d


# ---- tensor parallelism (applied from outside the core model) -----------------------------------
def parallelize_tensor(core: nn.Module, *, world_size: int) -> nn.Module:
    """Replace the core's projections in place by megatron tensor-parallel layers.

    Order: embeddings first (vocab-parallel rows), then per layer/cross block the column-parallel
    input projections (qkv / q,k,v / fc1, outputs stay sharded) and row-parallel output projections
    (out_proj / fc2, inputs sharded, output all-reduced); attention modules get H / N local heads.
    Weights are re-created empty: load the rank's ``-model_part-r`` state dict afterwards.
    """
    from metaseq.modules.megatron import mpu

    class Column(mpu.ColumnParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # megatron returns (out, bias)
            out, bias = super().forward(x)
            return out if bias is None else out + bias

    class Row(mpu.RowParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, bias = super().forward(x)
            return out if bias is None else out + bias

    def noinit(w: torch.Tensor) -> None:
        return None

    def column(lin: nn.Linear) -> nn.Module:
        return Column(lin.in_features, lin.out_features, bias=lin.bias is not None, gather_output=False,
                      init_method=noinit)

    def row(lin: nn.Linear) -> nn.Module:
        return Row(lin.in_features, lin.out_features, bias=lin.bias is not None, input_is_parallel=True,
                   init_method=noinit)

    d = core.decoder
    for name in ("layers", "layers_llm", "layers_cm3"):
        for layer in getattr(d, name, []):
            attn = layer.self_attn
            if attn.heads % world_size:
                raise ValueError(f"{attn.heads} heads do not split over model-parallel size {world_size}")
            attn.qkv_proj, attn.out_proj = column(attn.qkv_proj), row(attn.out_proj)
            attn.heads //= world_size
            layer.fc1, layer.fc2 = column(layer.fc1), row(layer.fc2)
    for name in ("x_attn_layers_llm", "x_attn_layers_cm3"):
        for block in getattr(d, name, []):
            x = block.cross_attn
            x.q_proj, x.k_proj, x.v_proj = column(x.q_proj), column(x.k_proj), column(x.v_proj)
            x.out_proj = row(x.out_proj)
            x.heads //= world_size
            block.fc1, block.fc2 = column(block.fc1), row(block.fc2)
    emb = d.embed_tokens
    d.embed_tokens = mpu.VocabParallelEmbedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx,
                                                init_method=noinit)
    # Output projection tied to the vocab shard: logits stay sharded (B, T, V/N).
    d.output_projection = _VocabParallelOutput(d.embed_tokens)
    return core


class _VocabParallelOutput(nn.Module):
    """x (B, T, E) -> local logits (B, T, V/N) with the tied vocab-parallel embedding shard."""

    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        self.__dict__["embedding"] = embedding  # tied: no second parameter

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from metaseq.modules.megatron import mpu

        return torch.nn.functional.linear(mpu.copy_to_tensor_model_parallel_region(x), self.embedding.weight)


# ---- model ---------------------------------------------------------------------------------
class JamMetaseqDecoder(BaseDecoder):
    """metaseq decoder around a core JAM model; children are the core's ``decoder.*`` modules."""

    def __init__(self, dictionary: Dictionary, core: nn.Module) -> None:
        super().__init__(dictionary)
        for name, child in core.decoder.named_children():
            self.add_module(name, child)
        for name, buf in core.decoder.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        self.__dict__["core"] = core

    def train(self, mode: bool = True) -> "JamMetaseqDecoder":
        super().train(mode)
        self.core.train(mode)
        return self

    def forward(self, prev_output_tokens: torch.Tensor, incremental_state: Any = None,
                features_only: bool = False, **unused: Any):
        if incremental_state is not None:
            raise NotImplementedError("incremental decoding of JAM models: use jam-generate (KV cache)")
        x = self.core.extract_features(prev_output_tokens)
        if features_only:
            return x, {}
        return self.core.decoder.output_projection(x), {}

    def extract_features(self, prev_output_tokens: torch.Tensor, **unused: Any):
        return self.core.extract_features(prev_output_tokens), {}

    def output_layer(self, features: torch.Tensor, **unused: Any) -> torch.Tensor:
        return self.core.decoder.output_projection(features)

    def max_positions(self) -> int:
        return self.core.cfg.max_positions


class JamMetaseqModel(BaseModel):
    """A JAM model as a metaseq decoder-only model."""

    def __init__(self, decoder: JamMetaseqDecoder, jam_config: Any, model_parallel_size: int) -> None:
        super().__init__()
        self.decoder = decoder
        self.jam_config = jam_config
        self.model_parallel_size = model_parallel_size

    @staticmethod
    def add_args(parser: Any) -> None:
        jam_args.add_model_args(parser)

    @classmethod
    def build_model(cls, args: Namespace, task: Any) -> "JamMetaseqModel":
        vocab: VocabManifest = task.vocab
        dictionary = task.target_dictionary
        cfg = jam_args.config_from_args(args, vocab_size=len(dictionary), padding_idx=dictionary.pad(),
                                        image_range=(vocab.image_start, vocab.image_end))
        vocab.check_embedding(cfg.vocab_size, what="model")
        args.jam_config = cfg.to_dict()
        core = build_model(cfg)
        mp = int(getattr(args, "model_parallel_size", 1) or 1)
        if mp > 1:
            parallelize_tensor(core, world_size=mp)
        model = cls(JamMetaseqDecoder(dictionary, core), cfg, mp)
        task.on_model_built(model, args)
        return model

    def forward(self, src_tokens: torch.Tensor, **kwargs: Any):
        return self.decoder(src_tokens, **kwargs)

    def max_positions(self) -> int:
        return self.decoder.max_positions()


# ---- data / task -----------------------------------------------------------------------------
class CM3MetaseqDataset(BaseDataset):
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
        return np.arange(len(self), dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.items.set_epoch(epoch)


class CM3MultimodalMetaseqTask(_TaskBase):
    """metaseq twin of ``hosts.fairseq.CM3MultimodalTask`` (same flags, data layout and items)."""

    @staticmethod
    def add_args(parser: Any) -> None:
        add_task_args(parser)

    def __init__(self, args: Namespace, vocab: VocabManifest, dictionary: Dictionary) -> None:
        super().__init__(args)
        self.args = args
        self.vocab = vocab
        self.dictionary = dictionary
        self.opts = task_options_from_args(args, vocab)
        self.state.merge_state_dict({"vocab_manifest": vocab.to_dict()})

    @classmethod
    def setup_task(cls, args: Namespace, **kwargs: Any) -> "CM3MultimodalMetaseqTask":
        vocab = load_manifest(args.data.split(":")[0], train_subset=getattr(args, "train_subset", "train"))
        return cls(args, vocab, dictionary_from_manifest(vocab))

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs: Any) -> None:
        from jam_metaseq.data.binarize import open_dataset

        sources = {n: open_dataset(p, vocab=self.vocab) for n, p in find_sources(self.opts.data, split).items()}
        train = split == getattr(self.args, "train_subset", "train")
        items = CM3Items(sources, vocab=self.vocab, opts=self.opts, train=train, epoch=epoch)
        self.datasets[split] = CM3MetaseqDataset(items, pad=self.dictionary.pad())

    def on_model_built(self, model: JamMetaseqModel, args: Namespace) -> None:
        self.state.merge_state_dict({"jam_config": model.jam_config.to_dict()})
        if model.model_parallel_size > 1:
            return  # per-part files (-model_part-r): metaseq checks them as it loads
        path = start_checkpoint(restore_file=getattr(args, "restore_file", None),
                                finetune_from_model=getattr(args, "finetune_from_model", None),
                                save_dir=getattr(args, "save_dir", "checkpoints"))
        if path is not None:
            import os

            if os.path.exists(path):
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
class CM3MetaseqCriterion(BaseCriterion):
    """Same loss and logs as the fairseq ``cm3`` criterion; vocab-parallel nll at MP > 1."""

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
        target = sample["target"]
        if getattr(model, "model_parallel_size", 1) > 1:
            from metaseq.modules.megatron import mpu

            nll = mpu.vocab_parallel_cross_entropy(logits.float(), target)  # (B, T)
        else:
            nll = per_token_nll(logits, target)
        weights = token_weights(target, vocab=self.vocab, loss_mask=sample.get("loss_weights"),
                                sentinel_weight=self.sentinel_weight, padding_idx=self.padding_idx)
        out = reduce_token_nll(nll, target, vocab=self.vocab, weights=weights)
        logging_output = logging_output_of(out, sample)
        return out.loss, out.weight_sum.data, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs: list[dict[str, Any]]) -> None:
        reduce_cm3_metrics(logging_outputs, metrics=metrics, get_perplexity=_perplexity)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def _perplexity(loss_base2: float, round: int = 2) -> float:
    try:
        return float(f"{2 ** loss_base2:.{round}f}")
    except OverflowError:
        return float("inf")


# ---- registration --------------------------------------------------------------------------
_registered = False


def register() -> None:
    """Register with metaseq (idempotent; metaseq's registries refuse duplicates)."""
    global _registered
    if _registered:
        return
    allow_checkpoint_globals()
    from metaseq import checkpoint_utils

    patch_host_upgrader(checkpoint_utils)
    try:
        from metaseq.distributed import utils as distributed_utils

        patch_host_broadcast(distributed_utils)
    except ImportError:
        pass
    for family in jam_args.FAMILIES:
        if family not in MODEL_REGISTRY:
            register_model(family)(type(f"JamMetaseqModel_{family}", (JamMetaseqModel,), {}))
    for arch, (family, size) in jam_args.arch_names().items():
        if arch not in ARCH_MODEL_REGISTRY:
            def fill(args: Namespace, family: str = family, size: str = size) -> None:
                jam_args.apply_arch_defaults(args, family=family, size=size)

            register_model_architecture(family, arch)(fill)
    if TASK_NAME not in TASK_REGISTRY:
        register_task(TASK_NAME)(CM3MultimodalMetaseqTask)
    if CRITERION_NAME not in CRITERION_REGISTRY:
        register_criterion(CRITERION_NAME)(CM3MetaseqCriterion)
    _registered = True

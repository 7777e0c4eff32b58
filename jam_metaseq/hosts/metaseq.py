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
Data, items, task, criterion and decoder logic are shared with the fairseq adapter (mixins in
``hosts.common``; loss math in ``objectives.loss``); this module keeps what metaseq does differently.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

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

from jam_metaseq.hosts.common import (
    CM3CriterionMixin, CM3DatasetMixin, CM3TaskMixin, CoreDecoderMixin, JamModelMixin, build_core,
    reduce_cm3_metrics, register_with_host,
)
from jam_metaseq.vocab import VocabManifest

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
class JamMetaseqDecoder(CoreDecoderMixin, BaseDecoder):
    """metaseq decoder around a core JAM model (``hosts.common.CoreDecoderMixin``)."""

    def forward(self, prev_output_tokens: torch.Tensor, incremental_state: Any = None,
                features_only: bool = False, **unused: Any):
        return self.core_forward(prev_output_tokens, incremental_state=incremental_state,
                                 features_only=features_only)


class JamMetaseqModel(JamModelMixin, BaseModel):
    """A JAM model as a metaseq decoder-only model."""

    def __init__(self, decoder: JamMetaseqDecoder, jam_config: Any, model_parallel_size: int) -> None:
        super().__init__()
        self.decoder = decoder
        self.jam_config = jam_config
        self.model_parallel_size = model_parallel_size

    @classmethod
    def build_model(cls, args: Namespace, task: Any) -> "JamMetaseqModel":
        cfg, core = build_core(args, task)
        mp = int(getattr(args, "model_parallel_size", 1) or 1)
        if mp > 1:
            parallelize_tensor(core, world_size=mp)
        model = cls(JamMetaseqDecoder(task.target_dictionary, core), cfg, mp)
        task.on_model_built(model, args)
        return model

    def forward(self, src_tokens: torch.Tensor, **kwargs: Any):
        return self.decoder(src_tokens, **kwargs)


# ---- data / task -----------------------------------------------------------------------------
class CM3MetaseqDataset(CM3DatasetMixin, BaseDataset):
    """``hosts.common.CM3Items`` as a metaseq BaseDataset (``hosts.common.CM3DatasetMixin``)."""


class CM3MultimodalMetaseqTask(CM3TaskMixin, _TaskBase):
    """metaseq twin of ``hosts.fairseq.CM3MultimodalTask`` (same flags, data layout and items);
    at model-parallel size > 1 the start checkpoint is left to metaseq's per-part loading."""

    dataset_class = CM3MetaseqDataset
    make_dictionary = staticmethod(dictionary_from_manifest)


# ---- criterion -----------------------------------------------------------------------------
class CM3MetaseqCriterion(CM3CriterionMixin, BaseCriterion):
    """Same loss and logs as the fairseq ``cm3`` criterion; vocab-parallel nll at MP > 1."""

    def token_nll(self, model: Any, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if getattr(model, "model_parallel_size", 1) > 1:
            from metaseq.modules.megatron import mpu

            return mpu.vocab_parallel_cross_entropy(logits.float(), target)  # (B, T)
        return super().token_nll(model, logits, target)

    @staticmethod
    def reduce_metrics(logging_outputs: list[dict[str, Any]]) -> None:
        reduce_cm3_metrics(logging_outputs, metrics=metrics, get_perplexity=_perplexity)


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
    from metaseq import checkpoint_utils

    try:
        from metaseq.distributed import utils as distributed_utils
    except ImportError:
        distributed_utils = None
    register_with_host(
        model_class=JamMetaseqModel, model_registry=MODEL_REGISTRY, register_model=register_model,
        arch_registry=ARCH_MODEL_REGISTRY, register_model_architecture=register_model_architecture,
        task=(CM3MultimodalMetaseqTask, TASK_REGISTRY, register_task),
        criterion=(CM3MetaseqCriterion, CRITERION_REGISTRY, register_criterion),
        checkpoint_utils=checkpoint_utils, distributed_utils=distributed_utils)
    _registered = True

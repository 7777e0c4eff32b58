"""metaseq host adapter: the ``jam_*`` models, the ``cm3_multimodal`` task and the ``cm3`` criterion
for ``metaseq-train`` (JAM §3.1: "All our training procedures are implemented using Metaseq").

Written against metaseq main at f7ffa5f (``metaseq.models.register_model`` /
``register_model_architecture``, ``metaseq.tasks.register_task`` with ``LegacyTask``,
``metaseq.criterions.register_criterion`` with ``BaseCriterion``, ``metaseq.logging.metrics``) and
imported lazily: nothing here runs unless metaseq is installed and imported. Tested end to end
through the real ``metaseq-train`` / ``metaseq-validate`` on a CPU build of metaseq (tests marked
``metaseq``; ``docs/METASEQ.md``).

- The archs set metaseq's required ``--decoder-learned-pos --share-decoder-input-output-embed``
  (``hosts.args.apply_arch_defaults``); sharded state is the launcher's ``--use-sharded-state``.
- ``--model-parallel-size N > 1``: ``parallelize_tensor`` builds rank r's part of the core model
  (built on the meta device, its initial values drawn tensor by tensor from ``--seed`` alone, only
  the rank's piece of each kept), the layer for each projection chosen by its key's split rule
  (``jam_metaseq.models.keys``, the plan ``jam-ckpt --mp N`` writes files with), so rank r holds
  exactly the ``-model_part-r`` tensors; the criterion uses ``vocab_parallel_cross_entropy`` on the
  vocab-split logits. The core stays plain PyTorch.
- Checkpoints load under torch >= 2.6 through the same allow-list as fairseq, and starting files
  are checked before training (``hosts.compat.check_trainer_start``).
Data, items, task, criterion and decoder logic are shared with the fairseq adapter (``task.items``,
mixins in ``hosts.common``, loss math in ``objectives.loss``); this module keeps what metaseq does
differently.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

import torch
from torch import nn

from metaseq.criterions import BaseCriterion
from metaseq.data import BaseDataset, Dictionary
from metaseq.models import BaseDecoder, BaseModel

try:  # metaseq main
    from metaseq.tasks.base_task import LegacyTask as _TaskBase
except ImportError:  # older trees: BaseTask takes the args namespace as cfg
    from metaseq.tasks.base_task import BaseTask as _TaskBase
try:
    from metaseq.logging import metrics
except ImportError:
    from metaseq import metrics  # type: ignore[no-redef]

from jam_metaseq.hosts import compat
from jam_metaseq.hosts.common import (
    CM3CriterionMixin, CM3DatasetMixin, CM3TaskMixin, CoreDecoderMixin, JamModelMixin, build_core,
    host_dictionary, reduce_cm3_metrics, register_with_host,
)
from jam_metaseq.models import fresh_buffer, fresh_parameters, keys
from jam_metaseq.vocab import VocabManifest


def dictionary_from_manifest(vocab: VocabManifest) -> Dictionary:
    """A metaseq Dictionary whose ids are the manifest's."""
    return host_dictionary(Dictionary, vocab)


# ---- tensor parallelism (applied from outside the core model) -----------------------------------
def parallelize_tensor(core: nn.Module, cfg: Any, *, world_size: int, rank: int | None = None) -> nn.Module:
    """Make ``core``, built from ``cfg`` on the meta device right after seeding torch's generator,
    rank ``rank``'s part of a ``world_size``-way tensor-parallel model with its initial weights,
    in place.

    Each parameter's whole initial value is drawn one tensor at a time, from the same random
    stream ``build_model(cfg)`` draws (``jam_metaseq.models.fresh_parameters``), and only this
    rank's piece, ``layout.split(key, whole, world_size)[rank]``, is kept: a rank never holds the
    whole model, only its part plus one whole tensor (and megatron's own scratch copy of one layer's
    weight while it builds it), and a model built from one seed is the same model at every size.

    One plan with the checkpoint tools: every ``nn.Linear`` / ``nn.Embedding`` of the core gets the
    megatron layer its key's rule (``jam_metaseq.models.keys``, applied by ``checkpoints_tools.layout``)
    implies (``vocab``: vocab-parallel embedding, and the tied output projection on its shard;
    ``column`` / ``qkv``: column-parallel linear, outputs left sharded; ``row``: row-parallel linear,
    inputs sharded, output all-reduced; ``replicated``: unchanged), so the rank's ``state_dict()`` is
    by construction the ``-model_part-{rank}`` file ``jam-ckpt --mp`` writes. Attention modules
    whose projections were split keep ``heads / world_size`` local heads.
    """
    from checkpoints_tools import layout
    from metaseq.modules.megatron import mpu

    if world_size <= 1:
        raise ValueError("parallelize_tensor splits a model over 2 or more ranks")
    check_model_parallel(cfg, world_size)
    if not all(t.is_meta for t in core.parameters()):
        raise ValueError("parallelize_tensor builds a model from scratch: pass it built on the meta device")
    rank = mpu.get_tensor_model_parallel_rank() if rank is None else rank
    column_cls, row_cls = _megatron_linears()
    pieces: dict[str, torch.Tensor] = {}
    for key, whole in fresh_parameters(core, cfg):
        piece = layout.split(key, whole, world_size)[rank]
        pieces[key] = piece.clone() if piece._base is not None else piece  # a view would keep ``whole``
        del whole, piece

    def fill(new: nn.Module, prefix: str) -> nn.Module:
        with torch.no_grad():
            for name, p in new.named_parameters(recurse=False):
                key = f"{prefix}.{name}"
                want = pieces.pop(key)
                if tuple(p.shape) != tuple(want.shape):  # the plan and the layer disagree
                    raise ValueError(f"{key}: rule {layout.rule_for(key)!r} gives {tuple(want.shape)} "
                                     f"but the tensor-parallel layer holds {tuple(p.shape)}")
                p.copy_(want)
        return new

    def noinit(w: torch.Tensor) -> None:  # weights are filled from the plan right after
        return None

    embedding: Any = None
    tied: list[tuple[nn.Module, str]] = []
    split_parents: set[str] = set()
    modules = dict(core.named_modules())  # as built (the loop replaces some)
    for name, module in modules.items():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        key = f"{name}.weight"
        rule = layout.rule_for(key)
        if rule == "replicated":
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = core.get_submodule(parent_name)
        kw = {"init_method": noinit, "dtype": module.weight.dtype}  # megatron's default dtype is half
        if isinstance(module, nn.Embedding) and rule == "vocab":
            new = fill(mpu.VocabParallelEmbedding(module.num_embeddings, module.embedding_dim, module.padding_idx,
                                                  **kw), name)
            embedding = new
        elif isinstance(module, nn.Linear) and rule == "vocab" and key == keys.OUTPUT \
                and getattr(modules.get(f"{parent_name}.embed_tokens"), "weight", None) is not module.weight:
            # an output projection of its own (an untied Llama-2/3 head next to its embedding, or
            # asymmetric JAM-Cross of two widths): its vocab rows split like a column-parallel
            # layer's outputs (local logits, as the tied one gives)
            new = fill(column_cls(module.in_features, module.out_features, bias=False, gather_output=False, **kw),
                       name)
        elif isinstance(module, nn.Linear) and rule == "vocab":
            tied.append((parent, attr))  # the output projection: tied to the embedding shard below
            emb = modules.get(f"{parent_name}.embed_tokens")
            if f"{name}.weight" not in keys.TIED or emb is None or module.weight is not emb.weight:
                raise ValueError(f"{key}: a vocab-parallel output projection must be tied to {keys.EMBED}")
            continue
        elif isinstance(module, nn.Linear) and rule in ("column", "qkv"):
            _check_bias(layout, module, name, rule=rule)
            new = fill(column_cls(module.in_features, module.out_features, bias=module.bias is not None,
                                  gather_output=False, **kw), name)
            split_parents.add(parent_name)
        elif isinstance(module, nn.Linear) and rule == "row":
            new = fill(row_cls(module.in_features, module.out_features, bias=module.bias is not None,
                               input_is_parallel=True, **kw), name)
            split_parents.add(parent_name)
        else:
            raise ValueError(f"{key}: no tensor-parallel layer for rule {rule!r} on {type(module).__name__}")
        setattr(parent, attr, new)
    for parent, attr in tied:
        if embedding is None:
            raise ValueError("a vocab-parallel output projection needs a vocab-parallel embed_tokens")
        setattr(parent, attr, _VocabParallelOutput(embedding))
    for key, value in pieces.items():  # what stays whole: LayerNorms, positions, replicated biases ...
        owner, _, attr = key.rpartition(".")
        core.get_submodule(owner).register_parameter(attr, nn.Parameter(value))
    for key, buf in list(core.named_buffers()):
        if buf.is_meta:
            owner, _, attr = key.rpartition(".")
            core.get_submodule(owner).register_buffer(attr, fresh_buffer(key))
    for name in sorted(split_parents):
        attn = core.get_submodule(name)
        if hasattr(attn, "heads"):
            if attn.heads % world_size:
                raise ValueError(f"{name}: {attn.heads} heads do not split over model-parallel size {world_size}")
            attn.heads //= world_size
    return core


def check_model_parallel(cfg: Any, world_size: int) -> None:
    """Stop with one line (``hosts.compat.ModelSetupError``) when ``world_size`` ranks cannot split
    the model ``cfg``: heads, grouped k/v heads (``num_key_value_heads % mp``), FFN, width and
    vocabulary of each branch (``checkpoints_tools.layout.check_mp``, the rule jam-ckpt writes by)."""
    from checkpoints_tools import layout
    from jam_metaseq.models.config import CrossConfig

    branches = [("", cfg)] if not isinstance(cfg, CrossConfig) else \
        [("", cfg.llm)] if cfg.symmetric else [(" (LLM branch)", cfg.llm), (" (image branch)", cfg.img)]
    for label, c in branches:
        try:
            layout.check_mp(heads=c.heads, kv_heads=c.num_kv_heads, vocab_size=c.vocab_size, ffn_dim=c.ffn_dim,
                            embed_dim=c.embed_dim, parts=world_size, what=f"--model-parallel-size: the model{label}")
        except ValueError as e:
            raise compat.ModelSetupError(str(e)) from None


def shard_blocks(core: nn.Module) -> nn.Module:
    """One FSDP unit per block of the key schema (a decoder layer, a cross block: each
    ``{container}.{i}`` of ``keys.CONTAINERS``), in place, when called inside metaseq's
    ``fsdp_enable_wrap`` context (``metaseq-train --ddp-backend fully_sharded`` builds the model
    there); elsewhere metaseq's ``fsdp_wrap`` returns each block unchanged.

    A fully-sharded step then gathers one block's parameters at a time, as metaseq's own
    transformer does with its layers, instead of the whole model at once; the rest (embeddings,
    positions, the final LayerNorm, JAM-Cross's feature projection) is the root unit. These are
    the units ``jam-ckpt --fsdp`` writes (``checkpoints_tools.io.fsdp.fsdp_unit``), so its shards
    load into the run as they are (``docs/CHECKPOINTS.md``, FSDP shards)."""
    from metaseq.distributed import fsdp_wrap

    modules = dict(core.named_modules())
    for name in keys.CONTAINERS:
        container = modules.get(name)
        if isinstance(container, nn.ModuleList):
            for i in range(len(container)):
                container[i] = fsdp_wrap(container[i])
    return core


def _check_bias(layout: Any, module: nn.Linear, name: str, *, rule: str) -> None:
    """A column-parallel layer splits its bias by its weight's rule (a row-parallel layer's whole
    bias is caught by the shape check in ``fill``)."""
    if module.bias is not None and layout.rule_for(f"{name}.bias") != rule:
        raise ValueError(f"{name}.bias: checkpoints_tools.layout says {layout.rule_for(f'{name}.bias')!r}, "
                         f"its weight {rule!r}")


_MEGATRON_LINEARS: tuple[type, type] | None = None


def _megatron_linears() -> tuple[type, type]:
    """megatron's column/row-parallel linears returning the output alone (they return (out, bias))."""
    global _MEGATRON_LINEARS
    if _MEGATRON_LINEARS is None:
        from metaseq.modules.megatron import mpu

        class ColumnParallelLinear(mpu.ColumnParallelLinear):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out, bias = super().forward(x)
                return out if bias is None else out + bias

        class RowParallelLinear(mpu.RowParallelLinear):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out, bias = super().forward(x)
                return out if bias is None else out + bias

        _MEGATRON_LINEARS = (ColumnParallelLinear, RowParallelLinear)
    return _MEGATRON_LINEARS


class _VocabParallelOutput(nn.Module):
    """x (B, T, E) -> local logits (B, T, V/N) with the tied vocab-parallel embedding shard.

    ``weight`` is the embedding's own Parameter, registered here too: the state dict holds
    ``decoder.output_projection.weight`` as metaseq's own models and ``jam-ckpt --mp`` parts do,
    and the optimizer still sees one tensor."""

    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        self.weight = embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from metaseq.modules.megatron import mpu

        return torch.nn.functional.linear(mpu.copy_to_tensor_model_parallel_region(x), self.weight)


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
        super().__init__(decoder)  # metaseq's BaseModel takes (and type-checks) the decoder
        self.jam_config = jam_config
        self.model_parallel_size = model_parallel_size

    @classmethod
    def build_model(cls, args: Namespace, task: Any) -> "JamMetaseqModel":
        mp = model_parallel_size(args)
        # The full model's initial weights depend on --seed alone (not on what the process drew
        # before), so every model-parallel rank splits the same tensors and a run from scratch
        # starts from the same model at every model-parallel size.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(getattr(args, "seed", 1) or 1))
            if mp > 1:  # the rank's part only: built on the meta device, then drawn tensor by tensor
                cfg, core = build_core(args, task, meta=True)
                parallelize_tensor(core, cfg, world_size=mp)
            else:
                cfg, core = build_core(args, task)
        # Order: tensor parallelism inside the blocks (above), then one FSDP unit per block around
        # them; metaseq-train wraps the whole model (the root unit) after build_model returns.
        shard_blocks(core)
        model = cls(JamMetaseqDecoder(task.target_dictionary, core), cfg, mp)
        task.on_model_built(model, args)
        return model

    def forward(self, src_tokens: torch.Tensor, **kwargs: Any):
        return self.decoder(src_tokens, **kwargs)


def model_parallel_size(args: Namespace) -> int:
    """``--model-parallel-size``, checked against the model-parallel group this process is in."""
    mp = int(getattr(args, "model_parallel_size", 1) or 1)
    if mp > 1:
        from metaseq.modules.megatron.mpu import initialize

        got = initialize.get_tensor_model_parallel_world_size() \
            if initialize._TENSOR_MODEL_PARALLEL_GROUP is not None else 1
        if got != mp:
            raise ValueError(f"--model-parallel-size {mp}, but this process is one of {got} model-parallel "
                             f"ranks: start {mp} processes per model replica (torchrun --nproc_per_node {mp} "
                             f"metaseq-train ...)")
    return mp


def _task_state() -> Any:
    """A metaseq ``StatefulContainer`` with its own dicts (metaseq declares them on the class, so
    every container in a process would share one state)."""
    from metaseq.tasks.base_task import StatefulContainer

    state = StatefulContainer()
    state._state, state._factories = {}, {}
    return state


# ---- data / task -----------------------------------------------------------------------------
class CM3MetaseqDataset(CM3DatasetMixin, BaseDataset):
    """``task.items.CM3Items`` as a metaseq BaseDataset (``hosts.common.CM3DatasetMixin``)."""


class CM3MultimodalMetaseqTask(CM3TaskMixin, _TaskBase):
    """metaseq twin of ``hosts.fairseq.CM3MultimodalTask`` (same flags, data layout and items);
    at model-parallel size > 1 each rank checks its own ``-model_part-{r}`` starting file
    (``hosts.compat.check_trainer_start``)."""

    dataset_class = CM3MetaseqDataset
    make_dictionary = staticmethod(dictionary_from_manifest)

    def __init__(self, args: Namespace, vocab: Any, dictionary: Any) -> None:
        self.state = _task_state()  # metaseq's LegacyTask.__init__ creates none (fairseq's does)
        super().__init__(args, vocab, dictionary)

    def get_batch_iterator(self, dataset: Any, *args: Any, skip_remainder_batch: bool = True, **kwargs: Any):
        """metaseq's iterator drops an epoch's last batch unless told not to, and metaseq-validate
        does not tell it: validation items are all scored (the PPL covers the whole split)."""
        if not getattr(getattr(dataset, "items", None), "train", True):
            skip_remainder_batch = False
        return super().get_batch_iterator(dataset, *args, skip_remainder_batch=skip_remainder_batch, **kwargs)


# ---- criterion -----------------------------------------------------------------------------
class CM3MetaseqCriterion(CM3CriterionMixin, BaseCriterion):
    """Same loss and logs as the fairseq ``cm3`` criterion; vocab-parallel nll at MP > 1."""

    def token_nll(self, model: Any, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.size(-1) != self.vocab.size:  # this rank's vocab shard (B, T, V/N)
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
def register() -> None:
    """Register the JAM models, archs, task and criterion with metaseq (idempotent)."""
    register_with_host("metaseq", model_class=JamMetaseqModel, task_class=CM3MultimodalMetaseqTask, criterion_class=CM3MetaseqCriterion)

"""fairseq host adapter: the ``jam_*`` models, the ``cm3_multimodal`` task and the ``cm3`` criterion
(JAM §2.1, §3.1), so that

    fairseq-train DATA --user-dir .../jam_metaseq --task cm3_multimodal --criterion cm3 \
        --arch jam_cross_tiny --restore-file FUSED.pt --reset-optimizer --reset-dataloader ...

trains a JAM model from ``jam-ckpt`` output. Thin by design: flags -> ``jam_metaseq.flags`` ->
config dataclass -> ``jam_metaseq.models.build_model``; the data, task, criterion and decoder logic
live in ``hosts.common`` (mixins shared with the metaseq adapter), ``task.items`` and
``objectives.loss``. ``register()`` is idempotent; ``hosts.register_hosts`` calls it, from the
package's ``__init__`` when fairseq imports the package as its ``--user-dir``.

Checkpoints: the model's args (``cfg["model"]``, a Namespace fairseq pickles into every checkpoint)
carry ``jam_config`` = ``cfg.to_dict()``, and the task state (``task_state``) carries ``jam_config``
and ``vocab_manifest``; ``fairseq-validate`` and ``checkpoints_tools.load_model`` rebuild from them.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

import torch

from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion
from fairseq.data import Dictionary, FairseqDataset
from fairseq.models import FairseqIncrementalDecoder, FairseqLanguageModel
from fairseq.tasks import LegacyFairseqTask

from jam_metaseq.hosts.common import (
    CM3CriterionMixin, CM3DatasetMixin, CM3TaskMixin, CoreDecoderMixin, JamModelMixin, build_core,
    host_dictionary, reduce_cm3_metrics, register_with_host,
)
from jam_metaseq.vocab import VocabManifest


def dictionary_from_manifest(vocab: VocabManifest) -> Dictionary:
    """A fairseq Dictionary whose ids are the manifest's."""
    return host_dictionary(Dictionary, vocab)


# ---- model ---------------------------------------------------------------------------------
class JamDecoder(CoreDecoderMixin, FairseqIncrementalDecoder):
    """fairseq decoder around a core JAM model (``hosts.common.CoreDecoderMixin``)."""

    def forward(self, prev_output_tokens: torch.Tensor, encoder_out: Any = None,
                incremental_state: Any = None, features_only: bool = False, **unused: Any):
        return self.core_forward(prev_output_tokens, incremental_state=incremental_state,
                                 features_only=features_only)

    def reorder_incremental_state(self, incremental_state: Any, new_order: torch.Tensor) -> None:
        raise NotImplementedError("incremental decoding of JAM models: use jam-generate (KV cache)")


class JamLanguageModel(JamModelMixin, FairseqLanguageModel):
    """A JAM model (uniform / width / cross) as a fairseq language model."""

    def __init__(self, decoder: JamDecoder, jam_config: Any) -> None:
        super().__init__(decoder)
        self.jam_config = jam_config

    @classmethod
    def build_model(cls, args: Namespace, task: Any) -> "JamLanguageModel":
        cfg, core = build_core(args, task)
        model = cls(JamDecoder(task.target_dictionary, core), cfg)
        if hasattr(task, "on_model_built"):
            task.on_model_built(model, args)
        return model


# ---- data / task -----------------------------------------------------------------------------
class CM3FairseqDataset(CM3DatasetMixin, FairseqDataset):
    """``task.items.CM3Items`` as a FairseqDataset (``hosts.common.CM3DatasetMixin``)."""

    @property
    def can_reuse_epoch_itr_across_epochs(self) -> bool:
        return True  # same sizes every epoch: the batch plan can be reused


class CM3MultimodalTask(CM3TaskMixin, LegacyFairseqTask):
    """Mixed text + image-caption (+ interleaved) CM3 training; see ``hosts.common``."""

    dataset_class = CM3FairseqDataset
    make_dictionary = staticmethod(dictionary_from_manifest)


# ---- criterion -----------------------------------------------------------------------------
class CM3Criterion(CM3CriterionMixin, FairseqCriterion):
    """The ``cm3`` criterion (``hosts.common.CM3CriterionMixin``)."""

    @staticmethod
    def reduce_metrics(logging_outputs: list[dict[str, Any]]) -> None:
        reduce_cm3_metrics(logging_outputs, metrics=metrics, get_perplexity=utils.get_perplexity)


# ---- registration --------------------------------------------------------------------------
def register() -> None:
    """Register the JAM models, archs, task and criterion with fairseq (idempotent)."""
    register_with_host("fairseq", model_class=JamLanguageModel, task_class=CM3MultimodalTask, criterion_class=CM3Criterion)

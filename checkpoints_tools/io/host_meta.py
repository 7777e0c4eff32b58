"""What the hosts (metaseq, fairseq) need in a ``.pt`` besides the weights: ``cfg["model"]``
(the arch and the host flags of the config), the task / criterion / optimization groups their
evaluation CLIs rebuild from, and neutral ``optimizer_history`` / ``extra_state`` entries that
their checkpoint upgraders and ``--restore-file`` require; plus our own ``jam_config`` and
vocabulary manifest.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any, Mapping

from jam_metaseq import flags as jam_flags
from jam_metaseq.models.config import CHECKPOINT_KEY as CONFIG_KEY
from jam_metaseq.models.config import ModelConfig
from jam_metaseq.vocab import CHECKPOINT_KEY as VOCAB_KEY


def model_namespace(cfg: ModelConfig, *, model_parallel_size: int = 1) -> Namespace:
    """``cfg["model"]`` for metaseq/fairseq: the arch and the host flags of ``cfg``
    (``jam_metaseq.flags.args_from_config``, the one config -> flags map), plus
    ``jam_config``, which the hosts prefer. A plain parent is ``transformer_lm`` with no JAM family."""
    arch = jam_flags.host_arch(cfg)
    flags = jam_flags.args_from_config(cfg)
    flags.pop("jam_family")
    cross = jam_flags.cross_args(flags)
    return Namespace(_name=arch, arch=arch, **flags, model_parallel_size=model_parallel_size,
                     jam_family=arch if arch in jam_flags.FAMILIES else None, jam_config=cfg.to_dict(), **cross)


START_CRITERION = "CM3Criterion"
"""``criterion_name`` of the neutral history entry: the class name of the fairseq host's ``cm3``
criterion (``jam_metaseq.hosts.fairseq.CM3Criterion``). The trainers compare it only when they
restore an optimizer state, which a fresh starting checkpoint does not have."""


def start_optimizer_history() -> list[dict[str, Any]]:
    """One neutral ``optimizer_history`` entry: fairseq's and metaseq's ``_upgrade_state_dict``
    index ``optimizer_history[-1]`` unconditionally (``[]`` crashes them), and their trainers read
    ``num_updates`` from it (0: the run starts at update 0)."""
    return [{"criterion_name": START_CRITERION, "optimizer_name": "none",
             "lr_scheduler_state": {}, "num_updates": 0}]


def start_extra_state() -> dict[str, Any]:
    """The minimal ``extra_state`` for ``--restore-file`` without ``--reset-dataloader``: the
    upgraders look up ``extra_state["train_iterator"]`` (``None`` crashes them) and the trainer
    starts its data iterator at that epoch (1, iteration 0; ``version`` 2 = meters start fresh)."""
    return {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0, "shuffle": True, "version": 2},
            "val_loss": None}


def checkpoint_meta(cfg: ModelConfig, *, mp: int, fsdp: int, vocab: Mapping[str, Any] | None) -> dict[str, Any]:
    """Non-model keys of every written ``.pt``: what metaseq/fairseq restore from, plus our config.
    ``cfg`` also holds the task / criterion / optimization groups their evaluation CLIs rebuild
    the ``cm3_multimodal`` task and ``cm3`` criterion from (``saved_cfg_groups`` of the flag table)."""
    return {
        "cfg": {
            "model": model_namespace(cfg, model_parallel_size=mp),
            "common": {"model_parallel_size": mp},
            "distributed_training": {"distributed_world_size": mp * max(fsdp, 1),
                                     "use_sharded_state": fsdp > 0},
            **jam_flags.saved_cfg_groups(),
        },
        "criterion": None,
        "optimizer_history": start_optimizer_history(),
        "task_state": {},
        "extra_state": start_extra_state(),
        "last_optimizer_state": None,
        CONFIG_KEY: cfg.to_dict(),
        VOCAB_KEY: dict(vocab) if vocab else None,
    }

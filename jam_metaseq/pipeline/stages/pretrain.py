"""Stage ``pretrain``: continued pretraining of every variant on every budget through the host
(§3.1 "alignment"), each run starting from its fused checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jam_metaseq.pipeline.layout import budget_tag
from jam_metaseq.pipeline.spec import VARIANTS
from jam_metaseq.pipeline.stages.context import Context, fused_checkpoint, pretrain_data
from jam_metaseq.pipeline.stages.models import variant_flags
from jam_metaseq.pipeline.train import TrainJob


def stage_pretrain(ctx: Context) -> dict[int, dict[str, dict]]:
    plan, p = ctx.plan, ctx.p
    o = plan.pretrain
    tpu = o.batch_size * plan.data.tokens_per_sample
    out: dict[int, dict[str, dict]] = {}
    n = len(plan.variants) * len(plan.budgets)
    optim = {k: val for k, val in dataclasses.asdict(o).items() if k != "budget_tokens"}
    items = []
    for budget in plan.budgets:
        tag = budget_tag(budget)
        data_run = (ctx.markers["bin"].get(budget) or ctx.markers["bin"][None])["run"]
        for key in plan.variants:
            v = VARIANTS[key]
            rel = f"pretrain/{tag}/{key}"
            arch, flags = variant_flags(ctx, v)
            job, run = ctx.train(rel, TrainJob(
                desc=f"pretrain {len(items) + 1}/{n}: {v.label} ({tag} tokens)", data=pretrain_data(ctx, budget),
                save_dir=ctx.tmp(rel), arch=arch, model_flags=flags, optim=o, updates=budget // tpu,
                tokens_per_sample=plan.data.tokens_per_sample, seed=plan.seed + 1,
                restore=fused_checkpoint(ctx, key), mixture=o.mixture))

            def build(tmp: Path, run: Any = run, budget: int = budget) -> dict:
                return {**run(tmp), "budget": budget}

            items.append((rel, {"fused": ctx.markers["fused"][key]["run"], "data": data_run, "optim": optim,
                                "budget": budget, "shape": flags, "seed": plan.seed, "host": plan.host,
                                "precision": plan.precision}, build))
    markers = p.units("pretrain", items, resumable=True)
    for (rel, material, _), m in zip(items, markers):
        out.setdefault(material["budget"], {})[rel.rsplit("/", 1)[1]] = m
    ctx.markers["pretrain"] = out
    return out


def run(ctx: Context) -> None:
    stage_pretrain(ctx)


__all__ = ["run", "stage_pretrain"]

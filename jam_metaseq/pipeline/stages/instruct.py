"""Stage ``instruct``: instruction tuning of the chosen variants after continued pretraining on
the largest budget, one run per mixture (§2.2, Table 5); runs when the data has instruct documents."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jam_metaseq.pipeline.layout import mixture_name
from jam_metaseq.pipeline.spec import VARIANTS
from jam_metaseq.pipeline.stages.context import Context, pretrained_checkpoint
from jam_metaseq.pipeline.stages.models import variant_flags
from jam_metaseq.pipeline.train import TrainJob


def stage_instruct(ctx: Context) -> dict[str, dict]:
    plan, p = ctx.plan, ctx.p
    o = plan.instruct
    tpu = o.batch_size * plan.data.tokens_per_sample
    top = plan.budgets[-1]
    optim = {k: val for k, val in dataclasses.asdict(o).items() if k not in ("variants", "mixtures")}
    items = []
    for key in o.variants:
        v = VARIANTS[key]
        arch, flags = variant_flags(ctx, v)
        for mix in o.mixtures:
            name = mixture_name(mix)
            rel = f"instruct/{key}/{name}"
            job, run = ctx.train(rel, TrainJob(
                desc=f"instruct: {v.label} ({name})", data=ctx.path("bin") / "instruct", save_dir=ctx.tmp(rel),
                arch=arch, model_flags=flags, optim=o, updates=o.budget_tokens // tpu,
                tokens_per_sample=plan.data.tokens_per_sample, seed=plan.seed + 1,
                restore=pretrained_checkpoint(ctx, top, key), mixture=mix, instruction=True))

            def build(tmp: Path, run: Any = run, key: str = key, mix: dict = mix) -> dict:
                return {**run(tmp), "variant": key, "mixture": mix}

            items.append((rel, {"start": ctx.markers["pretrain"][top][key]["run"],
                                "bin": ctx.markers["bin"][None]["run"], "optim": optim, "mixture": mix,
                                "shape": flags, "seed": plan.seed, "host": plan.host}, build))
    markers = p.units("instruct", items, resumable=True)
    out = {rel.split("/", 1)[1]: m for (rel, _, _), m in zip(items, markers)}
    ctx.markers["instruct"] = out
    return out


def run(ctx: Context) -> None:
    if ctx.plan.data.has_instruct:
        stage_instruct(ctx)


__all__ = ["run", "stage_instruct"]

"""Stage ``parents``: a given checkpoint (recorded, read in place), or trained from the data through
the host, both parents from the same initialisation (§2: a text LLM and an image-text model)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jam_metaseq.pipeline.spec import PARENTS, VARIANTS
from jam_metaseq.pipeline.stages.context import Context, fingerprint
from jam_metaseq.pipeline.stages.models import variant_flags
from jam_metaseq.pipeline.train import TrainJob


def stage_parents(ctx: Context, bin_: dict) -> dict[str, dict]:
    plan, p = ctx.plan, ctx.p
    out: dict[str, dict] = {}
    ctx.markers["parents"] = out
    given = {role: getattr(plan.parents, role) for role in PARENTS if not getattr(plan.parents, role).trained}
    for role, spec in given.items():
        def record(tmp: Path, spec: Any = spec, role: str = role) -> dict:
            from checkpoints_tools.readers import open_checkpoint

            r = open_checkpoint(spec.checkpoint)
            cfg = r.config(**({"heads": spec.heads} if spec.heads else {}))
            return {"checkpoint": str(Path(spec.checkpoint).resolve()), "given": True, "config": cfg.to_dict(),
                    "params": r.num_params(), "curve": [], "updates": 0, "token_budget": 0}

        files = _checkpoint_files(spec.checkpoint)
        out[role] = p.unit("parents", f"parents/{role}", {"checkpoint": fingerprint(files), "heads": spec.heads},
                           record)
    items = []
    for role, source in (("llm", "text"), ("img", "caption")):
        if role in given:
            continue
        t = plan.parents.train
        tpu = t.batch_size * plan.data.tokens_per_sample
        rel = f"parents/{role}"
        # Same --seed for both: the two parents share their initialisation (as two models
        # fine-tuned from one base would), which is what makes weight averaging meaningful.
        arch, flags = variant_flags(ctx, VARIANTS["uniform"], role=role)
        job, run = ctx.train(rel, TrainJob(
            desc=f"parents: {role} ({source})", data=ctx.path("bin") / source, save_dir=ctx.tmp(rel), arch=arch,
            model_flags=flags, optim=t, updates=t.budget_tokens // tpu, tokens_per_sample=plan.data.tokens_per_sample,
            seed=plan.seed + 1))

        def build(tmp: Path, run: Any = run) -> dict:
            return {**run(tmp), "checkpoint": "checkpoint_last.pt"}

        material = {"bin": bin_[None]["run"], "train": dataclasses.asdict(t), "shape": flags,
                    "seed": plan.seed, "host": plan.host, "precision": plan.precision}
        items.append((rel, material, build))
    for (rel, _, _), m in zip(items, p.units("parents", items, resumable=True)):
        out[rel.split("/")[1]] = m
    return out


def _checkpoint_files(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        return sorted(f for f in path.iterdir() if f.is_file())
    if path.is_file():
        return [path]
    stem = path.name[:-3] if path.name.endswith(".pt") else path.name
    return sorted(path.parent.glob(f"{stem}-*.pt"))


def run(ctx: Context) -> None:
    stage_parents(ctx, ctx.markers["bin"])


__all__ = ["run", "stage_parents"]

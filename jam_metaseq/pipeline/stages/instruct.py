"""Stage ``instruct``: instruction tuning of the chosen variants after continued pretraining on
the largest budget, one run per mixture (§2.2, Table 5); runs when the data has instruct documents.

Conversations (docs/CONVERSATIONS.md) train with the instruct vocabulary (``context.instruct_vocab``:
the run's plus ``<user>``, ``<assistant>``, ``<eot>``). When the run's vocabulary lacks those
tokens, each variant's pretrained checkpoint first gets their rows (unit ``instruct/<variant>/start``:
``jam-ckpt extend-vocab``, rows set to the mean of the text rows) and the runs start from it. The
loss falls on the assistant turns only (the data's loss mask, ``--instruction``), and the CM3
transform keeps every span inside one turn (``objectives.cm3``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jam_metaseq.pipeline.layout import mixture_name
from jam_metaseq.pipeline.spec import VARIANTS
from jam_metaseq.pipeline.stages.context import (
    Context, instruct_vocab, instruct_vocab_path, pretrained_checkpoint, tokenizer_paths,
)
from jam_metaseq.pipeline.stages.models import variant_flags
from jam_metaseq.pipeline.train import TrainJob
from jam_metaseq.pipeline.units import PipelineError


def needs_rows(ctx: Context) -> bool:
    """The instruct vocabulary adds tokens to the run's: the pretrained models need their rows.
    Before the tokenizers stage has run (``--dry-run``), the run's manifest is the plan's
    ``data.vocab`` or the given parents' own, else one built without the tokens."""
    from jam_metaseq.vocab import VocabManifest

    if not ctx.plan.data.conversations:
        return False
    path = tokenizer_paths(ctx)["vocab"]
    if path.is_file():
        base = VocabManifest.load(path)
    elif ctx.plan.data.vocab is not None:
        base = VocabManifest.load(ctx.plan.data.vocab)
    else:
        base = next((v for _, v in ctx.given.values() if v is not None), None)
    return base is None or instruct_vocab(ctx, base) != base


def stage_start(ctx: Context, key: str) -> tuple[Path, str]:
    """(checkpoint, run id) an instruct run of variant ``key`` starts from: the pretrained one on the
    largest budget, or its copy with the conversation tokens' rows (``needs_rows``)."""
    top = ctx.plan.budgets[-1]
    ckpt, run = pretrained_checkpoint(ctx, top, key), ctx.markers["pretrain"][top][key]["run"]
    if not needs_rows(ctx):
        return ckpt, run
    rel = f"instruct/{key}/start"

    def build(tmp: Path, src: Path = ckpt) -> dict:
        from checkpoints_tools import ops
        from checkpoints_tools.io import OutputSpec

        opts = ops.CommonOptions(spec=OutputSpec(out_dir=tmp / "ckpt"), hash_sources=False, progress=ctx.progress,
                                 command=["jam run", "instruct", key, "extend-vocab"])
        ops.extend_vocab(src, opts=opts, new_vocab=instruct_vocab_path(ctx),
                         old_vocab=tokenizer_paths(ctx)["vocab"])
        pts = sorted((tmp / "ckpt").glob("*.pt"))
        if len(pts) != 1:
            raise PipelineError(f"{tmp / 'ckpt'}: jam-ckpt wrote {len(pts)} .pt files, expected 1")
        return {"checkpoint": f"ckpt/{pts[0].name}"}

    m = ctx.p.unit("instruct", rel, {"start": run, "bin": ctx.markers["bin"][None]["run"], "init": "text_mean"},
                   build)
    return ctx.path(rel) / m.get("checkpoint", "ckpt/checkpoint.pt"), m["run"]


def stage_instruct(ctx: Context) -> dict[str, dict]:
    plan, p = ctx.plan, ctx.p
    o = plan.instruct
    tpu = o.batch_size * plan.data.tokens_per_sample
    optim = {k: val for k, val in dataclasses.asdict(o).items() if k not in ("variants", "mixtures")}
    items = []
    for key in o.variants:
        v = VARIANTS[key]
        arch, flags = variant_flags(ctx, v)
        start, start_run = stage_start(ctx, key)
        for mix in o.mixtures:
            name = mixture_name(mix)
            rel = f"instruct/{key}/{name}"
            job, run = ctx.train(rel, TrainJob(
                desc=f"instruct: {v.label} ({name})", data=ctx.path("bin") / "instruct", save_dir=ctx.tmp(rel),
                arch=arch, model_flags=flags, optim=o, updates=o.budget_tokens // tpu,
                tokens_per_sample=plan.data.tokens_per_sample, seed=plan.seed + 1,
                restore=start, mixture=mix, instruction=True), vocab=instruct_vocab_path(ctx))

            def build(tmp: Path, run: Any = run, key: str = key, mix: dict = mix) -> dict:
                return {**run(tmp), "variant": key, "mixture": mix}

            items.append((rel, {"start": start_run, "bin": ctx.markers["bin"][None]["run"], "optim": optim,
                                "mixture": mix, "shape": flags, "seed": plan.seed, "host": plan.host}, build))
    markers = p.units("instruct", items, resumable=True)
    out = {rel.split("/", 1)[1]: m for (rel, _, _), m in zip(items, markers)}
    ctx.markers["instruct"] = out
    return out


def run(ctx: Context) -> None:
    if ctx.plan.data.has_instruct:
        stage_instruct(ctx)


__all__ = ["needs_rows", "run", "stage_instruct", "stage_start"]

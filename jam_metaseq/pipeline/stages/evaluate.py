"""Stage ``eval``: text and image-caption perplexity of every model on every evaluation set (paper
§3.2, Tables 1-5) through ``eval.ppl.evaluate_ppl_files``, the evaluation of ``jam-eval ppl``
(each document scored by ``eval.context``'s rule)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jam_metaseq.pipeline.layout import budget_tag
from jam_metaseq.pipeline.spec import PARENTS
from jam_metaseq.pipeline.stages.context import (
    KINDS, Context, Sources, eval_prefix, fused_checkpoint, parent_checkpoint, pretrained_checkpoint, tokenizer_paths,
)
from jam_metaseq.pipeline.units import write_json


def evaluation_sets(results: dict[str, dict], sets: dict[str, dict[str, str]]) -> dict:
    """``{"params", "arch", "sets": {kind: {name: {ppl, text_ppl, image_ppl, tokens}}}}`` from
    ``eval.ppl.evaluate_ppl_files``'s ``{file: result}`` of one checkpoint on ``sets[kind][name]``."""
    first = next(iter(results.values()))
    out: dict[str, Any] = {"arch": first["arch"], "params": first["params"], "sets": {}}
    for kind, named in sets.items():
        for name, prefix in named.items():
            r = results[str(prefix)]
            out["sets"].setdefault(kind, {})[name] = {"ppl": r["ppl"], "tokens": r["tokens"],
                                                      "text_ppl": r["text"]["ppl"], "image_ppl": r["image"]["ppl"]}
    return out


def eval_targets(ctx: Context) -> list[tuple[str, Path, str]]:
    """(name, checkpoint, upstream run id) of every model to evaluate."""
    plan = ctx.plan
    rows = [(f"parent_{r}", parent_checkpoint(ctx, r), ctx.markers["parents"][r]["run"]) for r in PARENTS]
    for key in plan.variants:
        rows.append((f"start/{key}", fused_checkpoint(ctx, key), ctx.markers["fused"][key]["run"]))
    for budget in plan.budgets:
        for key in plan.variants:
            rows.append((f"{budget_tag(budget)}/{key}", pretrained_checkpoint(ctx, budget, key),
                         ctx.markers["pretrain"][budget][key]["run"]))
    for name, m in (ctx.markers.get("instruct") or {}).items():
        rows.append((f"instruct/{name}", ctx.path(f"instruct/{name}") / "checkpoint_last.pt", m["run"]))
    return rows


def stage_eval(ctx: Context, src: Sources) -> dict[str, dict]:
    plan, p = ctx.plan, ctx.p
    sets = {kind: {name: str(eval_prefix(ctx, src, kind, name)) for name in src.eval_sets[kind]} for kind in KINDS}
    vocab = str(tokenizer_paths(ctx)["vocab"])
    results = {}
    for name, ckpt, run in eval_targets(ctx):
        def build(tmp: Path, ckpt: Path = ckpt, name: str = name) -> dict:
            from jam_metaseq.eval.ppl import evaluate_ppl_files

            files = ctx.placement.call(
                evaluate_ppl_files, checkpoint=str(ckpt), data=sorted({f for n in sets.values() for f in n.values()}),
                vocab=vocab, max_len=plan.data.tokens_per_sample, batch_size=plan.eval.batch_size,
                use_loss_mask=True, device=plan.device, progress=ctx.progress, desc=f"eval {name}")
            r = evaluation_sets(files, sets)
            write_json(tmp / "result.json", r)
            return {"result": r}

        # "prefix": None is the evaluation rule's key (eval.context: nothing before a document) as
        # runs have recorded it since the rule was adopted; a change of the rule changes it
        m = p.unit("eval", f"eval/{name}", {"model": run, "bin": ctx.markers["bin"][None]["run"], "sets": sets,
                                            "batch": plan.eval.batch_size, "prefix": None}, build)
        results[name] = m.get("result")
    ctx.markers["eval"] = results
    return results


def run(ctx: Context) -> None:
    stage_eval(ctx, ctx.sources)


__all__ = ["eval_targets", "evaluation_sets", "run", "stage_eval"]

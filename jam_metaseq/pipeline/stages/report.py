"""Stage ``report``: miniature Tables 1-5, the validation curves and the budget sweep
(``pipeline.report`` builds and draws them) from every run's results."""

from __future__ import annotations

from pathlib import Path

from jam_metaseq.pipeline import report as rp
from jam_metaseq.pipeline.stages.context import KINDS, Context
from jam_metaseq.pipeline.units import write_json


def stage_report(ctx: Context) -> dict:
    p = ctx.p
    runs = sorted(m["run"] for rel, m in p.markers.items() if rel.startswith(("eval/", "pretrain/", "parents/",
                                                                              "instruct/")))

    def build(tmp: Path) -> dict:
        data_tokens = {}
        for b in ctx.plan.budgets:
            stats = (ctx.markers["bin"].get(b) or ctx.markers["bin"][None]).get("stats", {})
            data_tokens[b] = {src: stats.get(f"train.{src}", {}).get("num_tokens") for src in KINDS}
        results = rp.build_results(plan=ctx.plan, evals=ctx.markers["eval"], parents=ctx.markers["parents"],
                                   pretrain=ctx.markers["pretrain"], instruct=ctx.markers.get("instruct"),
                                   data_tokens=data_tokens, conversations=ctx.markers.get("conversations"),
                                   drawing=ctx.markers.get("drawing"))
        write_json(tmp / "results.json", results, nan_as_null=True)  # strict JSON: null, not NaN
        (tmp / "tables.txt").write_text(rp.render_tables(results) + "\n")
        rp.plot_curves(results, tmp / "curves.png")
        if len(ctx.plan.budgets) > 1:
            rp.plot_sweep(results, tmp / "sweep.png")
        return {}

    m = p.unit("report", "report", {"runs": runs, "variants": ctx.plan.variants, "budgets": ctx.plan.budgets}, build)
    ctx.markers["report"] = m
    return m


def run(ctx: Context) -> None:
    stage_report(ctx)


__all__ = ["run", "stage_report"]

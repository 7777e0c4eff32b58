"""The report of ``jam run``: miniature Tables 1-5 of the paper, the validation curves, the budget
sweep, and the choice of the model that writes the answers.

``results.json`` holds one row per model (parents first, then every variant after continued
pretraining on the largest budget) with its perplexities on every evaluation set, its training
curve and its perplexities at the start of continued pretraining (the fused weights); ``sweep``
holds every variant's final text and caption PPL for every budget, the parents as references;
``instruct`` the instruction-tuned runs (Table 5), with the conversation measurements of those
tuned on conversations (``conversations``: assistant-turn PPL of held-out follow-ups with and
without their history, prompt-following accuracy single-turn and as a follow-up, the share of
answers closed with ``<eot>``; docs/CONVERSATIONS.md); with the built-in generator a row's ``drawn``
is its single-turn prompt-following score (pictures drawn after a caption, read off their pixels). ``tables.txt`` prints the tables,
``curves.png`` the validation curves of the largest budget, ``sweep.png`` PPL against
continued-pretraining tokens (one line per variant, parents as horizontal lines).

Table 1 of the paper is zero-shot accuracy on common-sense tasks; that needs real data, so the
miniature Table 1 reports text perplexity instead (and says so).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from jam_metaseq.pipeline.layout import budget_tag
from jam_metaseq.pipeline.spec import PAPER_CROSS, PARENTS, VARIANTS, PlanSpec, plan_dict

TABLE_NAMES = ("table1", "table2", "table3", "table4", "table5", "conversations", "sweep", "all")


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.2f}"
    return str(x)


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> str:
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "  ".join
    out = [title, line(h.ljust(w[i]) if i == 0 else h.rjust(w[i]) for i, h in enumerate(cells[0])),
           line("-" * x for x in w)]
    out += [line(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in cells[1:]]
    if note:
        out.append(note)
    return "\n".join(out)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.0f}K"


def _first(e: dict, kind: str) -> dict:
    """The first evaluation set of ``kind`` (the tables' column)."""
    named = e["sets"].get(kind) or {}
    return next(iter(named.values())) if named else {"ppl": float("nan"), "text_ppl": float("nan"),
                                                      "image_ppl": float("nan")}


def _ppls(e: dict) -> dict:
    t, c = _first(e, "text"), _first(e, "caption")
    return {"text_ppl": t["ppl"], "caption_ppl": c["ppl"], "caption_image_ppl": c["image_ppl"],
            "caption_text_ppl": c["text_ppl"], "sets": e["sets"]}


def build_results(*, plan: PlanSpec, evals: dict[str, dict], parents: dict[str, dict],
                  pretrain: dict[int, dict[str, dict]], instruct: dict[str, dict] | None = None,
                  data_tokens: dict[int, dict[str, int]] | None = None,
                  conversations: dict[str, dict] | None = None, drawing: dict[str, dict] | None = None) -> dict:
    """The results document: one row per model (parents first), curves, the sweep, the tables.
    ``data_tokens``: budget -> source -> training tokens of that budget's continued pretraining
    (the sweep then says how many epochs of each source a budget is). ``conversations``: instruct
    run -> ``eval.conversations.evaluate_conversations``'s result. ``drawing``: ``parent_img`` and
    ``<budget>/<variant>`` -> ``eval.conversations.evaluate_drawing``'s scores (a row's ``drawn``)."""
    drawing = drawing or {}
    top = plan.budgets[-1]
    rows = []
    for r, label in PARENTS.items():
        e, m = evals[f"parent_{r}"], parents[r]
        rows.append({"key": f"parent_{r}", "model": label, "role": "parent", "params": e["params"], **_ppls(e),
                     "curve": m.get("curve", []), "updates": m.get("updates", 0),
                     "token_budget": m.get("token_budget", 0), "given": bool(m.get("given")),
                     **({"drawn": drawing[f"parent_{r}"]} if f"parent_{r}" in drawing else {})})
    tag = budget_tag(top)
    for key in plan.variants:
        v, e, s, m = VARIANTS[key], evals[f"{tag}/{key}"], evals[f"start/{key}"], pretrain[top][key]
        rows.append({"key": key, "model": v.label, "role": "jam", "family": v.family, "init": v.init,
                     "cross_every": v.cross_every if v.family == "jam_cross" else None, "params": e["params"],
                     **_ppls(e), "start": {"text_ppl": _ppls(s)["text_ppl"], "caption_ppl": _ppls(s)["caption_ppl"]},
                     "curve": m["curve"], "updates": m["updates"], "token_budget": m["token_budget"],
                     **({"drawn": drawing[f"{tag}/{key}"]} if f"{tag}/{key}" in drawing else {})})
    by = {r["key"]: r for r in rows}

    def pick(keys: Sequence[str]) -> list[dict]:
        return [by[k] for k in keys if k in by]

    cross_main = PAPER_CROSS if PAPER_CROSS in by else next((k for k in plan.variants if k.startswith("cross")), None)
    t1 = [[r["model"], _size(r["params"]), r["text_ppl"]]
          for r in pick(["parent_llm", "uniform", "width_copy"] + ([cross_main] if cross_main else []))]
    t2 = [[r["model"], _size(r["params"]), r["caption_ppl"]]
          for r in pick(["parent_img", "uniform", "width_copy"] + ([cross_main] if cross_main else []))]
    t3 = [[r["init"].capitalize(), r["text_ppl"], r["caption_ppl"]] for r in pick(["width_copy", "width_average"])]
    t4 = [["X" if r["cross_every"] == 0 else str(r["cross_every"]), r["init"], _size(r["params"]), r["text_ppl"],
           r["caption_ppl"]]
          for init in ("paper", "preserve") for r in pick([f"cross{k}_{init}" for k in (0, 1, 2, 4)])]
    tpu = plan.pretrain.batch_size * plan.data.tokens_per_sample
    tables: dict[str, dict] = {
        "table1": {"title": "Table 1 (miniature): text modality; validation text PPL (lower is better)",
                   "header": ["Model", "Size", "Text PPL"], "rows": t1,
                   "note": "The paper reports zero-shot accuracy on PIQA, ARC, StoryCloze, Winograd(e); those "
                           "need real data, so this miniature reports text perplexity instead."},
        "table2": {"title": "Table 2 (miniature): image-text modality; validation image-caption PPL",
                   "header": ["Model", "Size", "Caption PPL"], "rows": t2,
                   "note": "Caption PPL = perplexity of whole caption+image documents (the MS-COCO PPL role)."},
        "table3": {"title": "Table 3 (miniature): JAM-Width initialisation",
                   "header": ["Init.", "Text PPL", "Caption PPL"], "rows": t3},
        "table4": {"title": "Table 4 (miniature): JAM-Cross cross-attention frequency (X = none)",
                   "header": ["C-Attn", "Init", "Size", "Text PPL", "Caption PPL"], "rows": t4},
    }
    results: dict[str, Any] = {"plan": plan_dict(plan), "budget": top, "rows": rows}
    # Table 5: instruction tuning with and without image-caption data
    if instruct:
        irows = []
        for name, m in instruct.items():
            e = evals[f"instruct/{name}"]
            irows.append({"key": name, "variant": m["variant"], "mixture": m["mixture"], **_ppls(e),
                          "curve": m["curve"], "updates": m["updates"], "token_budget": m["token_budget"],
                          **({"conversations": conversations[name]} if conversations and name in conversations
                             else {})})
        results["instruct"] = irows
        tables["table5"] = {"title": "Table 5 (miniature): instruction tuning; validation image-caption PPL",
                            "header": ["Model", "Mixture", "Caption PPL", "Text PPL"],
                            "rows": [[VARIANTS[r["variant"]].label, " + ".join(r["mixture"]), r["caption_ppl"],
                                      r["text_ppl"]] for r in irows]}
        conv = [r for r in irows if "conversations" in r]
        if conv:
            tables["conversations"] = _conversation_table(conv)
    # the budget sweep
    sweep = {"budgets": plan.budgets,
             "parents": {f"parent_{r}": {"model": PARENTS[r], **{k: by[f"parent_{r}"][k]
                                                                for k in ("text_ppl", "caption_ppl")}}
                         for r in PARENTS},
             "variants": {}}
    for key in plan.variants:
        pts = [evals[f"{budget_tag(b)}/{key}"] for b in plan.budgets]
        sweep["variants"][key] = {"model": VARIANTS[key].label,
                                  "text_ppl": [_ppls(e)["text_ppl"] for e in pts],
                                  "caption_ppl": [_ppls(e)["caption_ppl"] for e in pts]}
    if data_tokens:
        w = plan.pretrain.mixture
        sweep["epochs"] = {src: [round(b * w[src] / sum(w.values()) / data_tokens[b][src], 3)
                                 if data_tokens[b].get(src) else None for b in plan.budgets] for src in w}
    results["sweep"] = sweep
    if len(plan.budgets) > 1:
        header = ["Model"] + [f"{budget_tag(b)} text" for b in plan.budgets] + \
            [f"{budget_tag(b)} caption" for b in plan.budgets]
        srows = [[p["model"]] + [p["text_ppl"]] * len(plan.budgets) + [p["caption_ppl"]] * len(plan.budgets)
                 for p in sweep["parents"].values()]
        srows += [[s["model"], *s["text_ppl"], *s["caption_ppl"]] for s in sweep["variants"].values()]
        note = "Parents: no continued pretraining (the same value in every column)."
        if "epochs" in sweep:
            note += " Epochs of the training data per budget: " + "; ".join(
                f"{src} " + ", ".join(_fmt(e) for e in eps) for src, eps in sweep["epochs"].items()) + "."
        tables["sweep"] = {"title": "Budget sweep: validation PPL after continued pretraining on each budget (tokens)",
                           "header": header, "rows": srows, "note": note}
    drawn = any("drawn" in r for r in rows)
    allrows = [[r["model"], _size(r["params"]), r.get("start", {}).get("text_ppl"), r["text_ppl"],
                r.get("start", {}).get("caption_ppl"), r["caption_ppl"]]
               + ([(r.get("drawn") or {}).get("all")] if drawn else []) for r in rows]
    tables["all"] = {"title": "All models: validation PPL at the start of continued pretraining (fused) and after",
                     "header": ["Model", "Size", "Text@start", "Text", "Caption@start", "Caption"]
                     + (["Drawn"] if drawn else []), "rows": allrows,
                     "note": f"Same budget for every JAM model: {top // tpu} updates x {plan.pretrain.batch_size} "
                             f"x {plan.data.tokens_per_sample} tokens = {top:,} tokens; parents are the reference "
                             "rows (no continued pretraining)."
                             + (" Drawn: share of the pictures drawn after a caption ('a red circle on a white "
                                "background') whose background, colour and shape match it, read off their "
                                "pixels (a miniature GenEval, docs/CONVERSATIONS.md)." if drawn else "")}
    results["tables"] = {k: tables[k] for k in TABLE_NAMES if k in tables}
    return results


def _conversation_table(rows: Sequence[dict]) -> dict:
    """The conversation measurements of the instruct runs, beside their caption PPL."""
    def drawn(r: dict, name: str, key: str) -> Any:
        return ((r["conversations"].get("prompt_following") or {}).get(name) or {}).get(key)

    def ended(r: dict) -> Any:
        sets = (r["conversations"].get("prompt_following") or {}).values()
        n = sum(s["n"] for s in sets)
        return sum(s["ended_with_eot"] * s["n"] for s in sets) / n if n else None

    out = []
    for r in rows:
        h = r["conversations"]["history_ppl"] or {}
        out.append([VARIANTS[r["variant"]].label, " + ".join(r["mixture"]), r["caption_ppl"], h.get("with_history"),
                    h.get("without_history"), h.get("ratio"), drawn(r, "single", "all"), drawn(r, "follow_up", "all"),
                    ended(r)])
    return {"title": "Conversations: assistant-turn PPL of held-out follow-ups with and without the history; "
                     "pictures drawn as asked",
            "header": ["Model", "Mixture", "Caption PPL", "Turn PPL", "no history", "ratio", "Drawn: single",
                       "follow-up", "<eot>"],
            "rows": out,
            "note": "Turn PPL: the follow-up answers (second and later exchanges) of the held-out conversations, "
                    "scored after their history and alone (ratio = alone / after: above 1, the history helps). "
                    "Drawn: share of pictures whose background, colour and shape match the request (read off "
                    "their pixels), single-turn and as a follow-up; <eot>: share of those answers the model "
                    "closed itself."}


def render_tables(results: dict) -> str:
    return "\n\n".join(_table(t["title"], t["header"], t["rows"], t.get("note", ""))
                       for t in results["tables"].values() if t["rows"])


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results: dict, path: Path) -> None:
    """Validation PPL against updates: parents, then every JAM variant (text and image tokens)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = [("parents (from scratch)", "parent", None), ("continued pretraining: text-token PPL", "jam", "text_ppl"),
              ("continued pretraining: image-token PPL", "jam", "image_ppl")]
    colours = plt.get_cmap("tab20").colors
    for ax, (title, role, metric) in zip(axes, panels):
        for i, r in enumerate(results["rows"]):
            if r["role"] != role or not r["curve"]:
                continue
            metrics = [metric] if metric else (["text_ppl"] if r["key"] == "parent_llm" else ["text_ppl", "image_ppl"])
            for m in metrics:
                pts = [(c["update"], c[m]) for c in r["curve"] if m in c and math.isfinite(c[m])]
                if pts:
                    style = "--" if r.get("init") in ("preserve", "average") else "-"
                    label = r["model"] + ("" if metric else f" {m.split('_')[0]}")
                    ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", ms=3, label=label,
                            color=colours[(2 * i + (m == "image_ppl" and not metric)) % len(colours)])
        ax.set_title(title)
        ax.set_xlabel("update")
        ax.set_ylabel("validation PPL")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    _save(fig, path)


def plot_sweep(results: dict, path: Path) -> None:
    """Final text and caption PPL against continued-pretraining tokens: one line per variant, the
    parents as horizontal references."""
    plt = _plt()
    sweep = results["sweep"]
    budgets = sweep["budgets"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colours = plt.get_cmap("tab20").colors
    for ax, metric, title in zip(axes, ("text_ppl", "caption_ppl"), ("text PPL (Wikipedia role)",
                                                                      "image-caption PPL (MS-COCO role)")):
        for j, (key, p) in enumerate(sweep["parents"].items()):
            y = p[metric]
            if y is not None and math.isfinite(y):
                ax.axhline(y, color="black", ls=":" if key == "parent_llm" else "-.", lw=1.2, label=p["model"])
        for i, (key, s) in enumerate(sweep["variants"].items()):
            style = "--" if VARIANTS[key].init in ("preserve", "average") else "-"
            ax.plot(budgets, s[metric], style, marker="o", ms=4, color=colours[i % len(colours)], label=s["model"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(budgets)
        ax.set_xticklabels([budget_tag(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("continued-pretraining tokens per variant")
        ax.set_ylabel("validation PPL (final)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def best_model(results: dict, *, choice: str = "auto") -> dict:
    """The model that writes the answers: a variant named by ``choice``; for ``auto`` the
    instruction-tuned run with the lowest caption PPL if any, else the JAM-Cross row with the lowest
    geometric mean of text and caption PPL (any JAM row if no JAM-Cross was trained)."""
    jam = [r for r in results["rows"] if r["role"] == "jam"]
    if choice != "auto":
        return next(r for r in jam if r["key"] == choice)
    def ppl(v: float | None) -> float:  # results.json holds null for a metric that does not exist
        return math.inf if v is None or not math.isfinite(v) else v

    if results.get("instruct"):
        best = min(results["instruct"], key=lambda r: ppl(r["caption_ppl"]))
        return {**best, "model": f"{VARIANTS[best['variant']].label}, instruct ({best['key']})", "instruct": True}
    pool = [r for r in jam if r.get("family") == "jam_cross"] or jam
    return min(pool, key=lambda r: math.log(ppl(r["text_ppl"])) + math.log(ppl(r["caption_ppl"])))


def chat_model(results: dict, *, choice: str = "auto") -> dict | None:
    """The instruct run ``jam chat`` / ``jam serve`` are pointed at: the answering model
    (``best_model``) when it was tuned on conversations, else of the runs tuned on conversations
    the one whose follow-up answers have the lowest PPL after their history (without follow-ups to
    score, the lowest caption PPL); None when no run was tuned on conversations."""
    runs = [r for r in results.get("instruct") or [] if "conversations" in r]
    best = best_model(results, choice=choice) if runs else {}
    if best.get("instruct") and "conversations" in best:
        return best

    def key(r: dict) -> tuple[float, float]:
        h = r["conversations"]["history_ppl"]
        return (h["with_history"] if h else math.inf, r["caption_ppl"])

    return min(runs, key=key) if runs else None


__all__ = ["best_model", "build_results", "chat_model", "plot_curves", "plot_sweep", "render_tables"]

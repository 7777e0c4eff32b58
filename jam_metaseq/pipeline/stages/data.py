"""Stage ``data``: the generator's documents (JSONL + PNG files) or the plan's JSONL files
(fingerprinted, so a changed file re-runs what depends on it); a budget sweep grows the generator's
continued-pretraining set with the budget."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jam_metaseq.pipeline.layout import budget_tag
from jam_metaseq.pipeline.spec import PlanSpec
from jam_metaseq.pipeline.stages.context import KINDS, Context, Sources, fingerprint
from jam_metaseq.pipeline.units import bar, write_json


def _write_generated(tmp: Path, *, plan: PlanSpec, split: str, n_text: int, n_img: int, n_instruct: int,
                     seed: int, follow_up: float, progress: bool, image_dir: str) -> dict[str, int]:
    """The generator's documents of one split: ``{split}.{text,caption,instruct}.jsonl`` + PNGs
    (instruct: prompt/response documents, or conversations with ``instruct_format: conversation``)."""
    from jam_metaseq import quickstart_data as qd

    g = plan.data.builtin
    qd.write_jsonl(tmp / f"{split}.text.jsonl", qd.text_documents(n_text, seed=seed))
    images = tmp / image_dir
    images.mkdir(parents=True, exist_ok=True)
    docs = []
    samples = qd.caption_samples(n_img, size=g.image_size, seed=seed, follow_up=follow_up)
    with bar(len(samples), f"data: {split} images", enabled=progress, unit="img") as pbar:
        for i, s in enumerate(samples):
            rel = f"{image_dir}/{i:06d}.png"
            s.image.save(tmp / rel)
            docs.append(qd.caption_document(caption=s.caption, image=rel, follow_up=s.follow_up))
            pbar.update(1)
    qd.write_jsonl(tmp / f"{split}.caption.jsonl", docs)
    counts = {"text": n_text, "caption": n_img}
    if n_instruct and g.instruct_format == "conversation":
        idocs = []
        for i, c in enumerate(qd.conversation_samples(n_instruct, size=g.image_size, seed=seed + 77)):
            rels = [f"{image_dir}/conversation-{i:06d}-{k}.png" for k in range(len(c.pictures))]
            for rel, pic in zip(rels, c.pictures):
                pic.image.save(tmp / rel)
            idocs.append(qd.conversation_document(c, images=rels))
        qd.write_jsonl(tmp / f"{split}.instruct.jsonl", idocs)
    elif n_instruct:
        idocs = []
        for i, s in enumerate(qd.instruct_samples(n_instruct, size=g.image_size, seed=seed + 77)):
            rel = f"{image_dir}/instruct-{i:06d}.png"
            s.image.save(tmp / rel)
            idocs.append(qd.instruct_document(s, image=rel))
        qd.write_jsonl(tmp / f"{split}.instruct.jsonl", idocs)
        counts["instruct"] = n_instruct
    return counts


def stage_data(ctx: Context) -> Sources:
    plan, p = ctx.plan, ctx.p
    d, g = plan.data, plan.data.builtin
    if g is not None:
        def build(tmp: Path) -> dict:
            counts = {}
            for split, nt, ni, nn, seed, fu in (
                    ("train", g.train_texts, g.train_images, g.train_instruct, plan.seed, g.follow_up),
                    ("valid", g.valid_texts, g.valid_images, g.valid_instruct, plan.seed + 1000, 0.0)):
                counts[split] = _write_generated(tmp, plan=plan, split=split, n_text=nt, n_img=ni, n_instruct=nn,
                                                 seed=seed, follow_up=fu, progress=ctx.progress,
                                                 image_dir=f"images/{split}")
            return {"counts": counts}

        gen = {k: v for k, v in dataclasses.asdict(g).items() if k != "grow_with_budget"}
        if gen["instruct_format"] == "plain":  # the key runs recorded before conversations keep
            del gen["instruct_format"]
        m = p.unit("data", "data", {"seed": plan.seed, "generator": gen}, build)
        base = p.path("data")
        files = {split: {s: [base / f"{split}.{s}.jsonl"] for s in ("text", "caption")
                         + (("instruct",) if g.train_instruct else ())} for split in ("train", "valid")}
        grown, grown_runs = {}, {}
        if g.grow_with_budget:
            for budget in plan.budgets:
                factor = budget / plan.reference_budget
                extra_t, extra_i = (int(round(n * (factor - 1))) for n in (g.train_texts, g.train_images))
                if extra_t < 1 and extra_i < 1:
                    continue
                tag = budget_tag(budget)
                seed = (plan.seed * 1_000_003 + budget) % 2**31

                def build_more(tmp: Path, extra_t: int = max(1, extra_t), extra_i: int = max(1, extra_i),
                               seed: int = seed) -> dict:
                    return {"counts": _write_generated(tmp, plan=plan, split="train", n_text=extra_t, n_img=extra_i,
                                                       n_instruct=0, seed=seed, follow_up=g.follow_up,
                                                       progress=ctx.progress, image_dir="images")}

                gm = p.unit("data", f"data-{tag}", {"seed": seed, "generator": gen, "extra": [extra_t, extra_i]},
                            build_more)
                grown[budget] = {s: files["train"][s] + [p.path(f"data-{tag}") / f"train.{s}.jsonl"]
                                 for s in ("text", "caption")}
                grown_runs[budget] = gm["run"]
    else:
        files = {"train": {"text": d.text.train, "caption": d.caption.train},
                 "valid": {"text": d.text.valid, "caption": d.caption.valid}}
        if d.instruct is not None:
            files["train"]["instruct"] = d.instruct.train
            files["valid"]["instruct"] = d.instruct.valid
        grown, grown_runs = {}, {}
        every = sorted({f for split in files.values() for fs in split.values() for f in fs}
                       | {f for kind in ("text", "caption") for fs in (getattr(plan.eval, kind) or {}).values()
                          for f in fs})

        def record(tmp: Path) -> dict:
            write_json(tmp / "sources.json", {"files": {s: {k: [str(f) for f in v] for k, v in x.items()}
                                                       for s, x in files.items()}})
            return {}

        m = p.unit("data", "data", {"files": fingerprint(every)}, record)
    eval_sets = {kind: dict(getattr(plan.eval, kind) or {"valid": files["valid"][kind]}) for kind in KINDS}
    return Sources(files=files, grown=grown, eval_sets=eval_sets, run=m["run"], grown_runs=grown_runs)


def run(ctx: Context) -> None:
    ctx.sources = stage_data(ctx)


__all__ = ["run", "stage_data"]

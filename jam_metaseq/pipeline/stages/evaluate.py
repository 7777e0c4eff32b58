"""Stage ``eval``: text and image-caption perplexity of every model on every evaluation set (paper
§3.2, Tables 1-5) through ``eval.ppl.evaluate_ppl_files``, the evaluation of ``jam-eval ppl``
(each document scored by ``eval.context``'s rule); for every model tuned on conversations, the
conversation measurements of ``eval.conversations`` (docs/CONVERSATIONS.md): the assistant-turn
PPL of the held-out conversations' follow-ups with and without their history, and with the
built-in generator the prompt-following score of its drawing prompts (single-turn and follow-up);
with the built-in generator, the single-turn score of the image-text parent and of every variant
after continued pretraining, each asked by the picture's caption (issue 25 item 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jam_metaseq.pipeline.layout import budget_tag
from jam_metaseq.pipeline.spec import PARENTS
from jam_metaseq.pipeline.stages.context import (
    KINDS, Context, Sources, eval_prefix, fused_checkpoint, instruct_checkpoint, instruct_vocab_path, parent_checkpoint,
    pretrained_checkpoint, tokenizer_paths,
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
    """(name, checkpoint, upstream run id) of every model to evaluate (instruct runs last)."""
    plan = ctx.plan
    rows = [(f"parent_{r}", parent_checkpoint(ctx, r), ctx.markers["parents"][r]["run"]) for r in PARENTS]
    for key in plan.variants:
        rows.append((f"start/{key}", fused_checkpoint(ctx, key), ctx.markers["fused"][key]["run"]))
    for budget in plan.budgets:
        for key in plan.variants:
            rows.append((f"{budget_tag(budget)}/{key}", pretrained_checkpoint(ctx, budget, key),
                         ctx.markers["pretrain"][budget][key]["run"]))
    for name, m in (ctx.markers.get("instruct") or {}).items():
        rows.append((f"instruct/{name}", instruct_checkpoint(ctx, name), m["run"]))
    return rows


def stage_eval(ctx: Context, src: Sources) -> dict[str, dict]:
    plan, p = ctx.plan, ctx.p
    sets = {kind: {name: str(eval_prefix(ctx, src, kind, name)) for name in src.eval_sets[kind]} for kind in KINDS}
    vocab = str(tokenizer_paths(ctx)["vocab"])
    results = {}
    for name, ckpt, run in eval_targets(ctx):
        # an instruct model's vocabulary may have the conversation tokens: the data read the same
        model_vocab = str(instruct_vocab_path(ctx)) if name.startswith("instruct/") else vocab

        def build(tmp: Path, ckpt: Path = ckpt, name: str = name, model_vocab: str = model_vocab) -> dict:
            from jam_metaseq.eval.ppl import evaluate_ppl_files

            files = ctx.placement.call(
                evaluate_ppl_files, checkpoint=str(ckpt), data=sorted({f for n in sets.values() for f in n.values()}),
                vocab=model_vocab, max_len=plan.data.tokens_per_sample, batch_size=plan.eval.batch_size,
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
    ctx.markers["drawing"] = stage_drawing(ctx)
    ctx.markers["conversations"] = stage_conversations(ctx, src)
    return results


def drawing_prompts(ctx: Context) -> dict[str, list]:
    """The prompt-following sets (``quickstart_data.drawing_prompts``, a seed of their own): set
    name -> prompts, ``single`` with the built-in generator, ``follow_up`` too when it makes
    conversations; empty without it or with ``eval.drawing_prompts: 0``."""
    from jam_metaseq import quickstart_data as qd

    g, n = ctx.plan.data.builtin, ctx.plan.eval.drawing_prompts
    if g is None or n == 0:
        return {}
    seed = ctx.plan.seed + 2000
    return {name: qd.drawing_prompts(n, size=g.image_size, seed=seed, follow_up=follow)
            for name, follow in (("single", False), ("follow_up", True))
            if ctx.plan.data.conversations or not follow}


def drawing_config(ctx: Context) -> Any:
    """The decoding settings of every picture scored: the plan's ``generate`` sampling and guidance."""
    from jam_metaseq.generation.config import GenerationConfig
    from jam_metaseq.generation.sampling import SamplingConfig

    g = ctx.plan.generate
    sampling = SamplingConfig(temperature=g.temperature, top_p=g.top_p)
    return GenerationConfig(text=sampling, image=sampling, guidance_scale=g.guidance_scale)


def drawing_material(ctx: Context) -> dict:
    g = ctx.plan.generate
    return {"generate": {"guidance_scale": g.guidance_scale, "temperature": g.temperature, "top_p": g.top_p}}


def evaluate_drawing_job(**kw: Any) -> dict:
    """``eval.conversations.evaluate_drawing`` (module-level, so a SLURM job can run it)."""
    from jam_metaseq.eval.conversations import evaluate_drawing

    return evaluate_drawing(**kw)


def _image_tokenizer(ctx: Context) -> str | None:
    """The run's image tokenizer for a job's arguments; None when the data's images were VQ codes
    and none was given (issue 27: nothing to encode, no picture to draw)."""
    path = tokenizer_paths(ctx)["image_tokenizer"]
    return None if path is None else str(path)


def stage_drawing(ctx: Context) -> dict[str, dict]:
    """Single-turn prompt-following of the image-text parent and of every variant after continued
    pretraining on the largest budget (unit ``eval/drawing/<name>``), each asked by the picture's
    caption (``eval.conversations.caption_following``): ``{name: scores}``, the report's ``Drawn``
    beside each model's caption PPL. Empty without the built-in generator's drawing prompts."""
    plan, p = ctx.plan, ctx.p
    prompts = drawing_prompts(ctx).get("single")
    if not prompts:
        return {}
    seeds = list(range(plan.seed, plan.seed + plan.eval.drawing_seeds))
    tag = budget_tag(plan.budgets[-1])
    rows = [("parent_img", parent_checkpoint(ctx, "img"), ctx.markers["parents"]["img"]["run"])]
    rows += [(f"{tag}/{key}", pretrained_checkpoint(ctx, plan.budgets[-1], key),
              ctx.markers["pretrain"][plan.budgets[-1]][key]["run"]) for key in plan.variants]
    out = {}
    for name, ckpt, run in rows:
        def build(tmp: Path, name: str = name, ckpt: Path = ckpt) -> dict:
            r = ctx.placement.call(
                evaluate_drawing_job, checkpoint=str(ckpt), prompts=prompts, seeds=seeds, config=drawing_config(ctx),
                image_tokenizer=_image_tokenizer(ctx), out_dir=str(tmp), device=plan.device,
                desc=f"drawing {name}")
            write_json(tmp / "result.json", r)
            return {"result": r}

        material = {"model": run, "prompts": plan.eval.drawing_prompts, "seeds": seeds, **drawing_material(ctx)}
        out[name] = p.unit("eval", f"eval/drawing/{name}", material, build).get("result")
    return out


def evaluate_conversations_job(**kw: Any) -> dict:
    """``eval.conversations.evaluate_conversations`` (module-level, so a SLURM job can run it)."""
    from jam_metaseq.eval.conversations import evaluate_conversations

    return evaluate_conversations(**kw)


def stage_conversations(ctx: Context, src: Sources) -> dict[str, dict]:
    """The conversation measurements of every instruct run on conversations (unit
    ``eval/conversations/<variant>/<mixture>``): ``{name: {"history_ppl", "prompt_following"}}``."""
    plan, p = ctx.plan, ctx.p
    if not plan.data.conversations or not ctx.markers.get("instruct"):
        return {}
    drawing = drawing_prompts(ctx)
    seeds = list(range(plan.seed, plan.seed + plan.eval.drawing_seeds))
    valid = [str(f) for f in src.files["valid"]["instruct"]]
    out = {}
    for name, m in ctx.markers["instruct"].items():
        def build(tmp: Path, name: str = name) -> dict:
            import dataclasses

            from jam_metaseq.vocab import VocabManifest

            vocab = VocabManifest.load(instruct_vocab_path(ctx))
            config = dataclasses.replace(drawing_config(ctx), max_new_tokens=vocab.image_tokens_per_image + 2 + 32)
            r = ctx.placement.call(
                evaluate_conversations_job, checkpoint=str(instruct_checkpoint(ctx, name)), conversations=valid,
                fmt=plan.data.instruct_format, max_tokens=plan.data.tokens_per_sample,
                image_tokenizer=_image_tokenizer(ctx), drawing=drawing, seeds=seeds,
                config=config, out_dir=str(tmp), batch_size=plan.eval.batch_size, device=plan.device,
                desc=f"conversations {name}")
            write_json(tmp / "result.json", r)
            return {"result": r}

        material = {"model": m["run"], "bin": ctx.markers["bin"][None]["run"], "data": src.run,
                    "drawing": {"prompts": plan.eval.drawing_prompts, "seeds": seeds} if drawing else None,
                    **drawing_material(ctx), "tokens_per_sample": plan.data.tokens_per_sample}
        out[name] = p.unit("eval", f"eval/conversations/{name}", material, build).get("result")
    return out


def run(ctx: Context) -> None:
    stage_eval(ctx, ctx.sources)


__all__ = ["drawing_config", "drawing_prompts", "eval_targets", "evaluate_conversations_job", "evaluate_drawing_job",
           "evaluation_sets", "run", "stage_conversations", "stage_drawing", "stage_eval"]

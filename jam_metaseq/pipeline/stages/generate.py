"""Stage ``generate``: interleaved answers (text and a decoded image, §3.1 Decoding, classifier-free
guidance) from the model ``pipeline.report.best_model`` chooses, written as HTML."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jam_metaseq.pipeline.report import best_model
from jam_metaseq.pipeline.stages.context import (
    Context, instruct_checkpoint, instruct_vocab_path, pretrained_checkpoint, tokenizer_paths,
)
from jam_metaseq.pipeline.stages.models import parent_config
from jam_metaseq.pipeline.units import log, read_json


def generate_answers_job(**kw: Any) -> list:
    """``generation.run.generate_answers`` (module-level, so a SLURM job can run it)."""
    from jam_metaseq.generation.run import generate_answers

    return generate_answers(**kw)


def stage_generate(ctx: Context) -> dict | None:
    """Answers from the chosen model (``report.best_model``); keyed by that model's run, so a change
    that leaves the choice alone (one more budget below the largest) does not regenerate them."""
    plan, p = ctx.plan, ctx.p
    g = plan.generate
    if not g.prompts:
        return None
    if ctx.dry:
        choice, ckpt, run = g.model, None, "dry"
    else:
        best = best_model(read_json(ctx.path("report") / "results.json"), choice=g.model)
        if best.get("instruct"):
            choice, run = best["key"], ctx.markers["instruct"][best["key"]]["run"]
            ckpt = instruct_checkpoint(ctx, best["key"])
        else:
            choice, run = best["key"], ctx.markers["pretrain"][plan.budgets[-1]][best["key"]]["run"]
            ckpt = pretrained_checkpoint(ctx, plan.budgets[-1], best["key"])
        label = best["model"]

    def build(tmp: Path) -> dict:
        from jam_metaseq.generation.engine import GenerationConfig
        from jam_metaseq.generation.run import PromptSpec
        from jam_metaseq.generation.sampling import SamplingConfig
        from jam_metaseq.vocab import VocabManifest

        from jam_metaseq.data.tokenizers import load_text_tokenizer

        paths = tokenizer_paths(ctx)
        # an instruct model's vocabulary may have the conversation tokens: its answers are then a
        # chat's first turns (generate_answers' prompt_prefix "auto")
        vocab_path = instruct_vocab_path(ctx) if best.get("instruct") else paths["vocab"]
        vocab = VocabManifest.load(vocab_path)
        positions = parent_config(ctx).max_positions
        tok = load_text_tokenizer(vocab.text_tokenizer)
        for text in g.prompts:
            n = len(tok.encode(text)) + 1
            if n + vocab.image_tokens_per_image + 2 > positions:
                log(f"generate: no room for an image after {text!r}: {n} prompt tokens + "
                    f"{vocab.image_tokens_per_image + 2} image tokens > the model's {positions} positions")
        if paths["image_tokenizer"] is None:
            log("generate: no image tokenizer (the data's images were VQ codes): pictures are not drawn, each "
                "image stays VQ codes in answers.jsonl; give data.image_tokenizer.path to draw them")
        sampling = SamplingConfig(temperature=g.temperature, top_p=g.top_p)
        gen = GenerationConfig(max_new_tokens=vocab.image_tokens_per_image + g.max_text_tokens, min_images=1,
                               max_images=1, guidance_scale=g.guidance_scale, seed=plan.seed, text=sampling,
                               image=sampling)
        answers = ctx.placement.call(
            generate_answers_job, checkpoint=ckpt, prompts=[PromptSpec(text=t) for t in g.prompts], config=gen,
            vocab_path=vocab_path,
            image_tokenizer=str(paths["image_tokenizer"]) if paths["image_tokenizer"] else None, out_dir=tmp,
            device=plan.device, progress=ctx.progress, desc="generate")
        return {"model": choice, "label": label, "answers": len(answers),
                "images": sum(1 for a in answers for s in a.images if getattr(s, "png", None))}

    return p.unit("generate", "generate", {"model": choice, "model_run": run, "generate": dataclasses.asdict(g),
                                           "tokenizers": ctx.markers["tokenizers"]["run"], "seed": plan.seed}, build)


def run(ctx: Context) -> None:
    ctx.markers["generate"] = stage_generate(ctx)


__all__ = ["generate_answers_job", "run", "stage_generate"]

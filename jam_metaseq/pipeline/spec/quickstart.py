"""The built-in plan of ``jam quickstart`` (``jam run --print-quickstart-plan``): the generator's
data, a trained text and image tokenizer, two parents trained from the same initialisation, every
variant, the paper's JAM-Cross tuned on the generator's conversations, scaled by ``--steps`` and
``--scale``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from jam_metaseq.pipeline.spec.schema import (
    DataSpec, EvalSpec, GenerateSpec, GeneratorSpec, ImageTokenizerSpec, InstructSpec, ParentsSpec, ParentTrainSpec,
    PlanSpec, PretrainSpec, RunSpec, ShapeSpec,
)
from jam_metaseq.pipeline.spec.variants import PAPER_CROSS, VARIANTS


QUICKSTART_UPDATES = {"parents": 500, "pretrain": 150, "instruct": 150}
"""Updates of each training stage of the built-in plan at ``--steps 1`` (batch 4 x 320 tokens)."""
QUICKSTART_TOKENS_PER_SAMPLE = 320
"""The built-in plan's sequence length: the generator's conversations (two or three exchanges, up
to three 66-token pictures: about 110-290 tokens with the trained tokenizer) fit whole, so the fit
rule drops no exchange and the follow-ups keep the history they refer to. Batches of 4 such
sequences hold the 1,280 tokens per update that 8 x 160 held before."""
QUICKSTART_INSTRUCT_LR = 1e-3
"""Peak learning rate of the built-in plan's instruction tuning (the plan default is 3e-4). Measured
on ``jam quickstart --variants cross2_paper`` (150 updates, docs/CONVERSATIONS.md): at 3e-4 the tuned
JAM-Cross closed none of its drawing answers with ``<eot>`` and its follow-up turns' PPL was 5.9-6.2;
at 1e-3, the continued pretraining's rate, it closes every answer and the PPL is 4.5-4.7."""
QUICKSTART_CONVERSATIONS = {"train": 600, "valid": 64}
"""The generator's conversations (instruct tuning; the held-out set scores the history PPL)."""


def quickstart_plan(*, steps: float = 1.0, scale: int = 1, device: str = "cpu", seed: int = 0,
                    variants: Sequence[str] | None = None, prompts: Sequence[str] | None = None,
                    jobs: int = 0, threads: int = 0) -> PlanSpec:
    """The built-in plan of ``jam quickstart``: the generator's data, a trained text and image
    tokenizer, two parents trained from the same initialisation, every variant, and the paper's
    JAM-Cross (else the first variant) instruction-tuned on the generator's conversations.
    ``steps`` multiplies every training stage's length (and the drawing prompts of the
    prompt-following score); ``scale`` the model width and the data."""
    if scale < 1:
        raise ValueError(f"--scale must be >= 1, got {scale}")
    if not steps > 0:
        raise ValueError(f"--steps must be > 0, got {steps}")

    def n(x: int, lo: int = 2) -> int:
        return max(lo, int(round(x * steps)))

    g = GeneratorSpec()
    shape = ShapeSpec()
    tps = QUICKSTART_TOKENS_PER_SAMPLE
    batch = 4 * (2 if scale > 1 else 1)
    tokens_per_update = batch * tps
    variants = list(variants) if variants is not None else list(VARIANTS)
    data = DataSpec(
        builtin=GeneratorSpec(train_texts=g.train_texts * scale, valid_texts=g.valid_texts * scale,
                              train_images=g.train_images * scale, valid_images=g.valid_images * scale,
                              train_instruct=QUICKSTART_CONVERSATIONS["train"] * scale,
                              valid_instruct=QUICKSTART_CONVERSATIONS["valid"] * scale,
                              instruct_format="conversation"),
        image_tokenizer=ImageTokenizerSpec(steps=n(600)), tokens_per_sample=tps)
    plan = PlanSpec(
        data=data, out=Path("runs/quickstart"), seed=seed, device=device,
        model=ShapeSpec(embed_dim=shape.embed_dim * scale, ffn_dim=shape.ffn_dim * scale, layers=shape.layers,
                        heads=shape.heads * scale),
        parents=ParentsSpec(train=ParentTrainSpec(
            batch_size=batch, budget_tokens=n(QUICKSTART_UPDATES["parents"]) * tokens_per_update)),
        variants=variants,
        pretrain=PretrainSpec(batch_size=batch,
                              budget_tokens=[n(QUICKSTART_UPDATES["pretrain"]) * tokens_per_update]),
        instruct=InstructSpec(variants=[PAPER_CROSS if PAPER_CROSS in variants else variants[0]], batch_size=batch,
                              budget_tokens=n(QUICKSTART_UPDATES["instruct"]) * tokens_per_update,
                              lr=QUICKSTART_INSTRUCT_LR),
        eval=EvalSpec(drawing_prompts=n(12, lo=1)),
        generate=GenerateSpec(**({"prompts": list(prompts)} if prompts is not None else {})),
        run=RunSpec(jobs=jobs, threads=threads))
    return plan


__all__ = ["QUICKSTART_CONVERSATIONS", "QUICKSTART_INSTRUCT_LR", "QUICKSTART_TOKENS_PER_SAMPLE", "QUICKSTART_UPDATES",
           "quickstart_plan"]

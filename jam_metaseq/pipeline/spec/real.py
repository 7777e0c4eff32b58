"""The built-in real-weights plan of ``jam quickstart --real`` (issue 28): SmolLM2-135M-Instruct
(a real pretrained Llama-family LLM, ``pipeline.real``) as the given text parent, a small image-text
parent of the same family trained here in SmolLM2's tokenizer plus 64 image codes, JAM-Cross
between the two sizes, continued pretraining on captions plus real text, evaluation on held-out
real text and captions. ``steps`` multiplies every training stage's length."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from jam_metaseq.pipeline.spec.schema import (
    DataSpec, EvalSpec, Files, GenerateSpec, ImageTokenizerSpec, ParentSpec, ParentsSpec, ParentTrainSpec, PlanSpec,
    PretrainSpec, RunSpec, ShapeSpec,
)

REAL_UPDATES = {"parents": 120, "pretrain": 32}
"""Updates of each training stage at ``--steps 1``: the image parent (batch 8 x 256 tokens) and the
continued pretraining of each variant (batch ``REAL_PRETRAIN_BATCH`` x 256 tokens)."""
REAL_PRETRAIN_BATCH = 4
"""Sequences per continued-pretraining update: 4 x 256 tokens keeps a JAM-Cross run of SmolLM2
(weights, gradients, Adam moments, activations, the 49,224-wide logits) near 5 GB."""
REAL_TOKENS = 256
"""Sequence length of training and evaluation."""
SMOLLM2_SHAPE = ShapeSpec(embed_dim=576, ffn_dim=1536, layers=30, heads=9, kv_heads=3, activation="silu", bias=False)
"""SmolLM2-135M's shape (the given LLM parent; the plan checks the checkpoint against it)."""
IMAGE_SHAPE = ShapeSpec(embed_dim=128, ffn_dim=512, layers=4, heads=4, kv_heads=4, activation="silu", bias=False)
"""The image-text parent trained here: SmolLM2's family (RMSNorm, rotary base, gated SiLU MLP, pad
id, tied embedding; ``stages.models.parent_config`` takes them from the given parent) at 4 layers
of width 128, small enough to train on 2 CPU cores. ``kv_heads`` is written out: the hosts'
``--img-kv-heads`` left unset would give the image branch the LLM's 3 key/value heads."""
REAL_VARIANTS = ("cross2_preserve",)
"""JAM-Cross every 2 layers of the image branch (the paper's row), started as the parents
(``preserve``). ``--variants cross2_preserve,cross2_paper`` adds the paper's initialisation (fresh
cross blocks and feature projection), at twice the continued-pretraining time."""
REAL_PROMPTS = ("a red circle on a white background", "a picture of a blue square on a black background")


def real_plan(inputs: Any, *, steps: float = 1.0, device: str = "cpu", seed: int = 0,
              variants: Sequence[str] | None = None, prompts: Sequence[str] | None = None, jobs: int = 0,
              threads: int = 0, out: Path | None = None) -> PlanSpec:
    """The real-weights plan on ``inputs`` (``pipeline.real.prepare_real_inputs``' ``RealInputs``).
    One training run at a time unless ``jobs`` says otherwise: a JAM-Cross run of SmolLM2 holds about
    4.7 GB (weights, Adam moments, the 49,224-wide logits of 2,048 tokens), two would pass 8 GiB."""
    if not steps > 0:
        raise ValueError(f"--steps must be > 0, got {steps}")

    def n(x: int, lo: int = 2) -> int:
        return max(lo, int(round(x * steps)))

    data = DataSpec(text=Files(train=[inputs.text_train], valid=[inputs.text_valid]),
                    caption=Files(train=[inputs.caption_train], valid=[inputs.caption_valid]),
                    image_tokenizer=ImageTokenizerSpec(steps=n(600)), num_sentinels=4, tokens_per_sample=REAL_TOKENS)
    return PlanSpec(
        data=data, out=out, seed=seed, device=device, model=SMOLLM2_SHAPE, image_model=IMAGE_SHAPE,
        parents=ParentsSpec(llm=ParentSpec(checkpoint=inputs.llm), img=ParentSpec(), train=ParentTrainSpec(
            batch_size=8, budget_tokens=n(REAL_UPDATES["parents"]) * 8 * REAL_TOKENS, lr=3e-3)),
        variants=list(variants) if variants is not None else list(REAL_VARIANTS),
        pretrain=PretrainSpec(batch_size=REAL_PRETRAIN_BATCH, lr=1e-4, warmup_fraction=0.25, curve_points=2,
                              budget_tokens=[n(REAL_UPDATES["pretrain"]) * REAL_PRETRAIN_BATCH * REAL_TOKENS]),
        eval=EvalSpec(batch_size=8),
        generate=GenerateSpec(prompts=list(prompts) if prompts is not None else list(REAL_PROMPTS)),
        run=RunSpec(jobs=jobs or 1, threads=threads))


__all__ = ["IMAGE_SHAPE", "REAL_PROMPTS", "REAL_TOKENS", "REAL_UPDATES", "REAL_VARIANTS", "SMOLLM2_SHAPE", "real_plan"]

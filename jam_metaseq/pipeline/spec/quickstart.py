"""The built-in plan of ``jam quickstart`` (``jam run --print-quickstart-plan``): the generator's
data, a trained text and image tokenizer, two parents trained from the same initialisation, every
variant, scaled by ``--steps`` and ``--scale``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from jam_metaseq.pipeline.spec.schema import (
    DataSpec, GenerateSpec, GeneratorSpec, ImageTokenizerSpec, ParentsSpec, ParentTrainSpec, PlanSpec, PretrainSpec,
    RunSpec, ShapeSpec,
)
from jam_metaseq.pipeline.spec.variants import VARIANTS


QUICKSTART_UPDATES = {"parents": 500, "pretrain": 150}
"""Updates of each training stage of the built-in plan at ``--steps 1`` (batch 8 x 160 tokens)."""


def quickstart_plan(*, steps: float = 1.0, scale: int = 1, device: str = "cpu", seed: int = 0,
                    variants: Sequence[str] | None = None, prompts: Sequence[str] | None = None,
                    jobs: int = 0, threads: int = 0) -> PlanSpec:
    """The built-in plan of ``jam quickstart``: the generator's data, a trained text and image
    tokenizer, two parents trained from the same initialisation, every variant. ``steps``
    multiplies every training stage's length; ``scale`` the model width and the data."""
    if scale < 1:
        raise ValueError(f"--scale must be >= 1, got {scale}")
    if not steps > 0:
        raise ValueError(f"--steps must be > 0, got {steps}")

    def n(x: int, lo: int = 2) -> int:
        return max(lo, int(round(x * steps)))

    g = GeneratorSpec()
    shape = ShapeSpec()
    batch = 8 * (2 if scale > 1 else 1)
    tokens_per_update = batch * 160
    data = DataSpec(
        builtin=GeneratorSpec(train_texts=g.train_texts * scale, valid_texts=g.valid_texts * scale,
                              train_images=g.train_images * scale, valid_images=g.valid_images * scale),
        image_tokenizer=ImageTokenizerSpec(steps=n(600)), tokens_per_sample=160)
    plan = PlanSpec(
        data=data, out=Path("runs/quickstart"), seed=seed, device=device,
        model=ShapeSpec(embed_dim=shape.embed_dim * scale, ffn_dim=shape.ffn_dim * scale, layers=shape.layers,
                        heads=shape.heads * scale),
        parents=ParentsSpec(train=ParentTrainSpec(
            batch_size=batch, budget_tokens=n(QUICKSTART_UPDATES["parents"]) * tokens_per_update)),
        variants=list(variants) if variants is not None else list(VARIANTS),
        pretrain=PretrainSpec(batch_size=batch,
                              budget_tokens=[n(QUICKSTART_UPDATES["pretrain"]) * tokens_per_update]),
        generate=GenerateSpec(**({"prompts": list(prompts)} if prompts is not None else {})),
        run=RunSpec(jobs=jobs, threads=threads))
    return plan


__all__ = ["QUICKSTART_UPDATES", "quickstart_plan"]

"""The paper's training stages as data (JAM §3.1 "Training", §3.3 / Table 4).

Each ``StageRecipe`` holds what the paper states (learning rate, warm-up, global batch in tokens,
length of training, GPUs) plus the few choices the paper leaves open, marked "ours" below.
"M" in "8M-token batches" is read as 2**20: 8 * 2**20 tokens = 256 GPUs x 4096 tokens x 8, and
5,960 updates x 8 * 2**20 tokens = 50.0B tokens, the paper's "approximately 50B".
"""

from __future__ import annotations

from dataclasses import dataclass

MIB_TOKENS = 2**20


@dataclass(frozen=True)
class StageRecipe:
    """One training stage of the paper."""

    name: str
    """Stage name as given to ``jam-launch --stage``."""
    description: str
    """One line for ``--help`` and the script header."""
    lr: float
    """Peak learning rate."""
    warmup_updates: int
    """Linear warm-up updates."""
    batch_tokens: int
    """Global batch in tokens per optimizer update."""
    gpus: int
    """GPUs the paper used (overridable)."""
    max_update: int = 0
    """Stop after this many updates (0 = no update limit)."""
    max_epoch: int = 0
    """Stop after this many epochs (0 = no epoch limit)."""
    keep_every_epoch: bool = False
    """Save and keep a checkpoint at the end of every epoch (instruct tuning: best was epoch 9)."""
    decay_to_zero: bool = True
    """Ours: linear decay to 0 over ``max_update`` after warm-up; False = constant after warm-up."""
    cross_every_sweep: tuple[int, ...] = ()
    """Table 4 ablation: one job per value of ``--cross-every`` (0 = no cross-attention)."""
    save_interval_updates: int = 500
    """Ours: checkpoint (and validate) every N updates; 0 = only at epoch ends."""
    time_hours: int = 24
    """Ours: SLURM time limit (the paper: about a day for alignment, < 2 h for instruct)."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """Adam's betas (OPT / CM3leon's)."""
    adam_eps: float = 1e-8
    """Adam's epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    clip_norm: float = 1.0
    """Gradient-norm clipping."""
    end_lr: float | None = None
    """Learning rate at the end of the schedule; None = ``decay_to_zero``'s rule (0, or ``lr``)."""
    log_interval: int = 10
    """Updates between training log lines."""


STAGES: dict[str, StageRecipe] = {
    "alignment": StageRecipe(
        name="alignment",
        description="continued pretraining after fusion: ~50B tokens of text + image-caption data",
        lr=3e-5, warmup_updates=500, batch_tokens=8 * MIB_TOKENS, gpus=256,
        max_update=5960, time_hours=36,
    ),
    "instruct": StageRecipe(
        name="instruct",
        description="interleaved instruction tuning: 15 epochs, every epoch's checkpoint kept",
        lr=1e-5, warmup_updates=300, batch_tokens=1 * MIB_TOKENS, gpus=64,
        max_epoch=15, keep_every_epoch=True, decay_to_zero=False, save_interval_updates=0,
        time_hours=4,
    ),
    "ablation_cross": StageRecipe(
        name="ablation_cross",
        description="Table 4: JAM-Cross with a cross block every 1/2/4 layers or none, 25B tokens",
        lr=3e-5, warmup_updates=500, batch_tokens=8 * MIB_TOKENS, gpus=256,
        max_update=25_000_000_000 // (8 * MIB_TOKENS),  # 2980 updates = 25.0B tokens
        cross_every_sweep=(1, 2, 4, 0), time_hours=20,
    ),
}


def stage(name: str) -> StageRecipe:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(STAGES)}")
    return STAGES[name]

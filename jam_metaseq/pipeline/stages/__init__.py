"""The stages of ``jam run`` (paper §2-3), one module each, in the order they run:

  data        the generator's documents or the plan's JSONL files (``stages.data``)
  tokenizers  the text and image tokenizers and the vocabulary manifest (``stages.tokenizers``)
  binarize    JSONL -> memory-mapped blocks for training and evaluation (``stages.binarize``)
  parents     given parent checkpoints, or parents trained from the data (``stages.parents``)
  fuse        JAM-Uniform, JAM-Width, JAM-Cross per variant with jam-ckpt (``stages.fuse``)
  pretrain    continued pretraining of every variant on every budget (``stages.pretrain``)
  instruct    instruction tuning of chosen variants (``stages.instruct``)
  eval        perplexity of every model on every evaluation set (``stages.evaluate``)
  report      miniature Tables 1-5, curves, the budget sweep (``stages.report``)
  generate    interleaved answers from the chosen model (``stages.generate``)

Each module's ``run(ctx)`` reads what earlier stages left in the ``Context`` (``stages.context``)
and leaves its own results there. ``PIPELINE`` is the list ``pipeline.run`` walks.
"""

from __future__ import annotations

from typing import Callable

from jam_metaseq.pipeline.stages import (
    binarize, data, evaluate, fuse, generate, instruct, parents, pretrain, report, tokenizers,
)
from jam_metaseq.pipeline.stages.context import Context
from jam_metaseq.pipeline.units import STAGES

PIPELINE: tuple[tuple[str, Callable[[Context], None]], ...] = (
    ("data", data.run),
    ("tokenizers", tokenizers.run),
    ("binarize", binarize.run),
    ("parents", parents.run),
    ("fuse", fuse.run),
    ("pretrain", pretrain.run),
    ("instruct", instruct.run),
    ("eval", evaluate.run),
    ("report", report.run),
    ("generate", generate.run),
)
"""(stage name, its run function), in order: the names are ``units.STAGES`` (``--stages``)."""

if tuple(name for name, _ in PIPELINE) != STAGES:  # pragma: no cover - a stage added to one list only
    raise ImportError(f"pipeline.stages.PIPELINE {[n for n, _ in PIPELINE]} differs from units.STAGES {STAGES}")

__all__ = ["PIPELINE", "Context"]
